//! Checkpoints: a [`State`] to and from safetensors, with PyTorch state_dict names and metadata.
//!
//! A checkpoint loads in Python with `safetensors.torch.load_file` and then into the matching
//! PyTorch module. Metadata (all strings, as safetensors requires) says what it is.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::model::{Architecture, State};
use crate::safetensors_io::{safetensors_bytes, safetensors_fault};
use layerlab_pipeline::cache::{self, Freshness};
use layerlab_pipeline::{fsutil, Experiment, Layout};

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckpointMeta {
    pub experiment: String,
    pub seed: u64,
    pub epoch: u32,
    pub step: u64,
    pub architecture: String,
    pub config_hash: String,
}

impl CheckpointMeta {
    fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("format".into(), "layerlab-checkpoint-1".into()),
            ("experiment".into(), self.experiment.clone()),
            ("seed".into(), self.seed.to_string()),
            ("epoch".into(), self.epoch.to_string()),
            ("step".into(), self.step.to_string()),
            ("architecture".into(), self.architecture.clone()),
            ("config_hash".into(), self.config_hash.clone()),
            ("layerlab_version".into(), layerlab_pipeline::VERSION.into()),
        ])
    }

    fn from_map(map: &HashMap<String, String>) -> Result<CheckpointMeta> {
        let get = |k: &str| map.get(k).cloned().with_context(|| format!("metadata lacks '{k}'"));
        let num =
            |k: &str| -> Result<u64> { get(k)?.parse().with_context(|| format!("metadata '{k}' is not a number")) };
        Ok(CheckpointMeta {
            experiment: get("experiment")?,
            seed: num("seed")?,
            epoch: u32::try_from(num("epoch")?).context("metadata 'epoch' is too large")?,
            step: num("step")?,
            architecture: get("architecture")?,
            config_hash: get("config_hash")?,
        })
    }
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes named f32 tensors with metadata, atomically and deterministically.
pub fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<()> {
    let entries = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), "F32", t.dims().to_vec(), tensor_bytes(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors_bytes(&entries, &metadata.into_iter().collect());
    fsutil::write_atomic(path, &bytes)
}

/// Reads every f32 tensor of a safetensors file, with its metadata.
pub fn load_tensors(path: &Path, device: &Device) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let invalid =
        |e| anyhow::anyhow!("{} is not a valid safetensors file: {}", path.display(), safetensors_fault(&bytes, e));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let st = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{}: tensor '{name}' is {:?}, expected F32", path.display(), view.dtype());
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        out.insert(name.clone(), Tensor::from_vec(values, view.shape().to_vec(), device)?);
    }
    Ok((out, header.metadata().clone().unwrap_or_default()))
}

/// Saves a network's weights as a checkpoint.
pub fn save(path: &Path, state: &State, meta: &CheckpointMeta) -> Result<()> {
    save_tensors(path, state, meta.to_map())
}

/// Loads a checkpoint and checks it belongs to `arch`: names, shapes, and the architecture tag.
pub fn load(path: &Path, arch: &Architecture, device: &Device) -> Result<(State, CheckpointMeta)> {
    let (state, metadata) = load_tensors(path, device)?;
    let meta = CheckpointMeta::from_map(&metadata)
        .with_context(|| format!("{} is not a layerlab checkpoint", path.display()))?;
    if meta.architecture != arch.name {
        bail!("{} holds a {} network, expected {}", path.display(), meta.architecture, arch.name);
    }
    arch.check_state(&state).with_context(|| format!("{} does not fit {}", path.display(), arch.name))?;
    Ok((state, meta))
}

/// Loads every kept checkpoint of a training run, in epoch order, refusing a run that is not
/// finished or was trained with other settings than `exp`'s.
pub fn load_run(
    layout: &Layout,
    exp: &Experiment,
    seed: u64,
    arch: &Architecture,
    device: &Device,
) -> Result<Vec<(u32, State)>> {
    let train_dir = layout.train_dir(&exp.name, seed);
    // The checkpoints must be of this experiment's current training settings: after a training
    // setting changed, a stage run by hand would otherwise evaluate the old run under the new key.
    let expected = cache::train_key(exp, seed);
    match cache::freshness(&train_dir, &expected) {
        Freshness::Fresh => {}
        Freshness::Missing => {
            anyhow::bail!("{} has no finished training run (no stamp.json): run train first", train_dir.display())
        }
        Freshness::Stale(why) => anyhow::bail!(
            "{} holds a training run of other settings ({why}): run train again first \
             (cargo xtask run train -e {} --seed {seed})",
            train_dir.display(),
            exp.name
        ),
    }
    let config_hash = expected.config_hash();
    exp.checkpoint_epochs()
        .into_iter()
        .map(|epoch| {
            let path = layout.checkpoint(&exp.name, seed, epoch);
            let (state, meta) = load(&path, arch, device)?;
            if meta.epoch != epoch || meta.seed != seed {
                anyhow::bail!(
                    "{} says epoch {} seed {}, expected epoch {epoch} seed {seed}",
                    path.display(),
                    meta.epoch,
                    meta.seed
                );
            }
            if meta.config_hash != config_hash {
                anyhow::bail!(
                    "{} was trained with other settings (config hash {}, expected {config_hash}): run train again first",
                    path.display(),
                    meta.config_hash
                );
            }
            Ok((epoch, state))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fcn, state_bits};

    #[test]
    fn round_trip_is_bit_exact_and_checks_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let arch = fcn(1, 8, [1, 4, 4], 3);
        let state = arch.initial_state(7, &Device::Cpu).unwrap();
        let meta = CheckpointMeta {
            experiment: "x".into(),
            seed: 7,
            epoch: 3,
            step: 99,
            architecture: arch.name.clone(),
            config_hash: "abc".into(),
        };
        let path = dir.path().join("epoch-0003.safetensors");
        save(&path, &state, &meta).unwrap();
        let (back, meta_back) = load(&path, &arch, &Device::Cpu).unwrap();
        assert_eq!(meta_back, meta);
        assert_eq!(state_bits(&back), state_bits(&state));
        // Another architecture is refused, naming the file.
        let other = fcn(1, 9, [1, 4, 4], 3);
        let err = format!("{:#}", load(&path, &other, &Device::Cpu).unwrap_err());
        assert!(err.contains("epoch-0003.safetensors"), "{err}");
    }
}
