//! Importing a run trained elsewhere (`train.import`): a folder of safetensors checkpoints, one
//! per kept epoch, checked against the experiment's architecture and rewritten as layerlab's own
//! checkpoints, with a `history.parquet` whose errors layerlab computes itself.
//!
//! Accepted beside our own names: torchvision's `downsample.0|1` for our `shortcut.0|1`, and
//! PyTorch's `num_batches_tracked` counters (of any integer type), which are dropped. Every file is
//! read and checked before anything is written, so a bad folder leaves the previous run whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::Split;
use crate::eval::EvalSet;
use crate::exec::Executor;
use crate::model::{Architecture, State};
use crate::safetensors_io::safetensors_fault;
use crate::train::EpochRecord;

/// One imported checkpoint, checked.
pub struct Imported {
    pub path: PathBuf,
    pub epoch: u32,
    /// The optimizer step, when the file's metadata says it (0 otherwise).
    pub step: u64,
    pub state: State,
}

/// Our name for a tensor of a PyTorch state_dict: torchvision calls a ResNet's projection
/// `downsample`, we call it `shortcut`.
pub fn our_name(name: &str) -> String {
    name.replace(".downsample.", ".shortcut.")
}

/// PyTorch's BatchNorm step counter, which layerlab does not keep.
fn is_step_counter(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}

/// The epoch a file's name gives: its stem's last run of digits (`epoch-0003`, `ckpt_12`, `5`).
fn epoch_in_name(path: &Path) -> Option<u32> {
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    let end = stem.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = stem[..end].rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
    stem[start..end].parse().ok()
}

/// Reads one file: its state under our names, checked against `arch` (every fault in one error
/// naming the file), and its epoch (from the metadata's `epoch`, else the name).
pub fn read(path: &Path, arch: &Architecture, device: &Device) -> Result<Imported> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let invalid =
        |e| anyhow::anyhow!("{} is not a valid safetensors file: {}", path.display(), safetensors_fault(&bytes, e));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let st = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let metadata = header.metadata().clone().unwrap_or_default();

    let mut faults = Vec::new();
    let mut state = State::new();
    let mut names: Vec<(String, String)> = st.names().into_iter().map(|n| (our_name(n), n.to_string())).collect();
    names.sort();
    for (ours, theirs) in &names {
        let view = st.tensor(theirs)?;
        if is_step_counter(theirs) {
            continue;
        }
        let Some(spec) = arch.spec(ours) else {
            faults.push(format!("unexpected tensor '{theirs}' ({} has none of that name)", arch.name));
            continue;
        };
        let shape_ok = view.shape() == spec.shape.as_slice();
        if !shape_ok {
            faults.push(format!("tensor '{theirs}' has shape {:?}, expected {:?}", view.shape(), spec.shape));
        }
        if view.dtype() != Dtype::F32 {
            faults.push(format!("tensor '{theirs}' is {:?}, expected F32", view.dtype()));
        }
        if shape_ok && view.dtype() == Dtype::F32 {
            let values: Vec<f32> =
                view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
            state.insert(ours.clone(), Tensor::from_vec(values, spec.shape.clone(), device)?);
        }
    }
    for (_, spec) in arch.tensor_specs() {
        if !names.iter().any(|(ours, _)| ours == &spec.name) {
            faults.push(format!("tensor '{}' {:?} is missing", spec.name, spec.shape));
        }
    }
    if !faults.is_empty() {
        bail!("{} does not fit {}: {}", path.display(), arch.name, faults.join("; "));
    }

    let from_meta = match metadata.get("epoch") {
        Some(text) => Some(
            text.parse::<u32>()
                .with_context(|| format!("{}: metadata 'epoch' = {text:?} is not an epoch number", path.display()))?,
        ),
        None => None,
    };
    let epoch = match (from_meta, epoch_in_name(path)) {
        (Some(meta), Some(name)) if meta != name => {
            bail!("{}: its metadata says epoch {meta} but its name says {name}", path.display())
        }
        (Some(epoch), _) | (None, Some(epoch)) => epoch,
        (None, None) => {
            bail!("{}: no epoch in its metadata ('epoch') or its name (e.g. epoch-0003.safetensors)", path.display())
        }
    };
    let step = metadata.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(Imported { path: path.to_path_buf(), epoch, step, state })
}

/// Reads and checks every checkpoint of an import folder against `arch` and the epochs the
/// experiment keeps (`expected`), in epoch order.
pub fn read_folder(dir: &Path, arch: &Architecture, expected: &[u32], device: &Device) -> Result<Vec<Imported>> {
    let files = layerlab_pipeline::cache::import_files(dir)
        .with_context(|| format!("cannot list the imported run's folder {}", dir.display()))?;
    if files.is_empty() {
        bail!("{} holds no .safetensors checkpoint to import", dir.display());
    }
    let mut by_epoch: BTreeMap<u32, Imported> = BTreeMap::new();
    for path in files {
        let imported = read(&path, arch, device)?;
        if let Some(other) = by_epoch.get(&imported.epoch) {
            bail!(
                "{} and {} are both epoch {}: keep one",
                other.path.display(),
                imported.path.display(),
                imported.epoch
            );
        }
        by_epoch.insert(imported.epoch, imported);
    }
    let found: Vec<u32> = by_epoch.keys().copied().collect();
    if !found.contains(&0) {
        bail!(
            "{} has no epoch 0 (found epochs {found:?}): re-initialization needs the initial weights, saved before \
             the first step",
            dir.display()
        );
    }
    if found != expected {
        let last = found.last().copied().unwrap_or(0);
        bail!(
            "{} holds epochs {found:?}, but the experiment keeps {expected:?}: set train.epochs = {last} and \
             train.checkpoints = {found:?}",
            dir.display()
        );
    }
    Ok(by_epoch.into_values().collect())
}

/// What [`import`] needs besides the checkpoints.
pub struct ImportJob<'a> {
    pub experiment: &'a str,
    pub seed: u64,
    pub arch: &'a Architecture,
    pub executor: &'a dyn Executor,
    pub test: &'a Split,
    pub test_examples: usize,
    pub train: &'a Split,
    /// The training examples the train error is measured on (reset-eval's subset).
    pub train_subset: Vec<usize>,
    pub eval_batch: usize,
    pub out_dir: &'a Path,
    pub config_hash: &'a str,
}

/// Writes the imported checkpoints as layerlab's and returns each epoch's record: the test error
/// and loss, and the train-subset error and loss as the train columns (no learning rate is known).
pub fn write_run(job: &ImportJob<'_>, run: &[Imported]) -> Result<Vec<EpochRecord>> {
    let test = EvalSet::new(job.test, (0..job.test_examples).collect(), job.eval_batch);
    let train = EvalSet::new(job.train, job.train_subset.clone(), job.eval_batch);
    let mut history = Vec::with_capacity(run.len());
    for imported in run {
        let t0 = Instant::now();
        let meta = CheckpointMeta {
            experiment: job.experiment.to_string(),
            seed: job.seed,
            epoch: imported.epoch,
            step: imported.step,
            architecture: job.arch.name.clone(),
            config_hash: job.config_hash.to_string(),
        };
        let path = job.out_dir.join("checkpoints").join(format!("epoch-{:04}.safetensors", imported.epoch));
        checkpoint::save(&path, &imported.state, &meta)?;
        let on_test = job.executor.evaluate(&imported.state, &test)?;
        let on_train = job.executor.evaluate(&imported.state, &train)?;
        tracing::info!(
            "imported epoch {}: test error {:.4}, train-subset error {:.4}",
            imported.epoch,
            on_test.error,
            on_train.error
        );
        history.push(EpochRecord {
            epoch: imported.epoch,
            step: imported.step,
            lr: f64::NAN,
            train_loss: Some(on_train.loss),
            train_error: Some(on_train.error),
            test_loss: on_test.loss,
            test_error: on_test.error,
            train_seconds: None,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::save_tensors;
    use crate::test_support::state_bits;
    use layerlab_pipeline::{Arch, ModelConfig};
    use std::collections::HashMap;

    fn resnet() -> Architecture {
        let cfg = ModelConfig { arch: Arch::Resnet18, width_mult: 0.0625, pad_to: 0, ..ModelConfig::default() };
        Architecture::build(&cfg, [1, 8, 8], 10).unwrap()
    }

    /// A state written the torchvision way: `downsample` for `shortcut`, and an i64 step counter
    /// beside every BatchNorm.
    fn write_torchvision(path: &Path, state: &State, epoch: Option<u32>) {
        let mut entries: Vec<(String, &str, Vec<usize>, Vec<u8>)> = state
            .iter()
            .map(|(k, v)| {
                let values: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                let name = k.replace(".shortcut.", ".downsample.");
                (name, "F32", v.dims().to_vec(), values.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect();
        for k in state.keys().filter(|k| k.ends_with(".running_mean")) {
            let name = k.replace(".running_mean", ".num_batches_tracked").replace(".shortcut.", ".downsample.");
            entries.push((name, "I64", vec![], 7i64.to_le_bytes().to_vec()));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let meta: BTreeMap<String, String> = epoch.map(|e| ("epoch".to_string(), e.to_string())).into_iter().collect();
        std::fs::write(path, crate::safetensors_io::safetensors_bytes(&entries, &meta)).unwrap();
    }

    #[test]
    fn torchvision_names_and_step_counters_import_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let arch = resnet();
        let states: Vec<State> = (0..3).map(|s| arch.initial_state(s, &Device::Cpu).unwrap()).collect();
        // Epoch 0 in the name only, epoch 2 in the metadata only, epoch 5 in both.
        write_torchvision(&dir.path().join("init-0.safetensors"), &states[0], None);
        write_torchvision(&dir.path().join("last.safetensors"), &states[1], Some(2));
        write_torchvision(&dir.path().join("epoch_5.safetensors"), &states[2], Some(5));
        let run = read_folder(dir.path(), &arch, &[0, 2, 5], &Device::Cpu).unwrap();
        assert_eq!(run.iter().map(|r| r.epoch).collect::<Vec<_>>(), [0, 2, 5]);
        for (imported, state) in run.iter().zip(&states) {
            assert_eq!(state_bits(&imported.state), state_bits(state));
        }
        // The experiment keeping other epochs is told what to set.
        let err = format!("{:#}", read_folder(dir.path(), &arch, &[0, 1, 5], &Device::Cpu).err().unwrap());
        assert!(err.contains("holds epochs [0, 2, 5]") && err.contains("train.checkpoints = [0, 2, 5]"), "{err}");
    }

    /// Every fault of a file in one error naming it: a missing tensor, an unexpected one, a wrong
    /// shape and a wrong type.
    #[test]
    fn each_fault_of_a_file_is_named_in_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let arch = resnet();
        let mut state = arch.initial_state(1, &Device::Cpu).unwrap();
        state.remove("layer2.0.bn1.running_var");
        state.insert("layer9.conv.weight".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
        state.insert("fc.bias".into(), Tensor::zeros(11, candle_core::DType::F32, &Device::Cpu).unwrap());
        let w = state["fc.weight"].to_dtype(candle_core::DType::F64).unwrap();
        let path = dir.path().join("epoch-0000.safetensors");
        let mut tensors: BTreeMap<String, Tensor> = state.clone();
        tensors.remove("fc.weight");
        save_tensors(&path, &tensors, HashMap::new()).unwrap();
        // Rewrite fc.weight as F64 by hand (our writer writes F32 only).
        let mut entries: Vec<(String, &str, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, v)| {
                let values: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                (k.clone(), "F32", v.dims().to_vec(), values.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect();
        let w64: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        entries.push((
            "fc.weight".into(),
            "F64",
            w.dims().to_vec(),
            w64.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        std::fs::write(&path, crate::safetensors_io::safetensors_bytes(&entries, &BTreeMap::new())).unwrap();
        let err = format!("{:#}", read(&path, &arch, &Device::Cpu).err().unwrap());
        for needle in [
            "epoch-0000.safetensors does not fit resnet18",
            "tensor 'layer2.0.bn1.running_var' [8] is missing",
            "unexpected tensor 'layer9.conv.weight'",
            "tensor 'fc.bias' has shape [11], expected [10]",
            "tensor 'fc.weight' is F64, expected F32",
        ] {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
    }

    #[test]
    fn corrupt_truncated_and_epochless_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let arch = resnet();
        let state = arch.initial_state(1, &Device::Cpu).unwrap();
        let good = dir.path().join("epoch-0000.safetensors");
        write_torchvision(&good, &state, None);
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("epoch-0001.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
        let err = format!("{:#}", read(&truncated, &arch, &Device::Cpu).err().unwrap());
        assert!(err.contains("epoch-0001.safetensors is not a valid safetensors file"), "{err}");
        let corrupt = dir.path().join("epoch-0002.safetensors");
        std::fs::write(&corrupt, b"not a checkpoint at all").unwrap();
        let err = format!("{:#}", read(&corrupt, &arch, &Device::Cpu).err().unwrap());
        assert!(err.contains("epoch-0002.safetensors is not a valid safetensors file"), "{err}");
        let nameless = dir.path().join("final.safetensors");
        write_torchvision(&nameless, &state, None);
        let err = format!("{:#}", read(&nameless, &arch, &Device::Cpu).err().unwrap());
        assert!(err.contains("final.safetensors: no epoch"), "{err}");
        // A folder without epoch 0 is refused: nothing to re-initialize to.
        let later = tempfile::tempdir().unwrap();
        write_torchvision(&later.path().join("epoch-0003.safetensors"), &state, None);
        let err = format!("{:#}", read_folder(later.path(), &arch, &[3], &Device::Cpu).err().unwrap());
        assert!(err.contains("has no epoch 0"), "{err}");
    }
}
