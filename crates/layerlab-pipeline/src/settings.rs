//! The settings that take one of a fixed set of names, as enums.
//!
//! Each is read from `pipeline.toml` by serde (an unknown name is refused there, with its line and
//! the names allowed) and written back into keys under the same name, so keys made when these
//! were strings still hold. Code matches them exhaustively: a new variant fails to compile
//! wherever it is not handled yet.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Declares a settings enum with its names in the pipeline file, `ALL`, `name()`, `Display` and
/// `FromStr` (for command-line flags).
macro_rules! named_enum {
    ($(#[$meta:meta])* $ty:ident { $($(#[$vmeta:meta])* $variant:ident = $name:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        pub enum $ty { $($(#[$vmeta])* #[serde(rename = $name)] $variant,)* }

        /// Only a string naming a variant: anything else is refused naming the allowed names
        /// (serde's derived form would answer `wanted string or table` to a number).
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
                struct Names;
                impl serde::de::Visitor<'_> for Names {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "one of {}", $ty::names())
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| E::unknown_variant(s, &[$($name,)*]))
                    }
                }
                deserializer.deserialize_str(Names)
            }
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant,)*];

            /// The name used in the pipeline file, on the command line and in tables.
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => $name,)* }
            }

            /// Every name, for messages.
            pub fn names() -> String {
                $ty::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<$ty, String> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    format!("unknown {} '{s}' (known: {})", stringify!($ty).to_lowercase(), $ty::names())
                })
            }
        }
    };
}

named_enum! {
    /// `model.arch`.
    Arch {
        Fcn = "fcn",
        Vgg11 = "vgg11",
        Vgg13 = "vgg13",
        Vgg16 = "vgg16",
        Vgg19 = "vgg19",
        Resnet18 = "resnet18",
        Resnet34 = "resnet34",
        /// Bottleneck blocks (1×1 → 3×3 → 1×1, expansion 4), as torchvision's ResNet-50 (v1.5:
        /// the stride on the 3×3).
        Resnet50 = "resnet50",
        Resnet101 = "resnet101",
    }
}

named_enum! {
    /// `model.init`: how Linear and Conv weights are drawn.
    WeightInit {
        /// PyTorch's default: weight and bias ~ U(−1/√fan_in, 1/√fan_in).
        Pytorch = "pytorch",
        /// Weight ~ N(0, 2/fan_in), bias 0.
        KaimingNormal = "kaiming-normal",
    }
}

named_enum! {
    /// `train.schedule`: the learning rate over training.
    Schedule {
        Constant = "constant",
        /// Multiplied by `lr_gamma` at each of `lr_milestones`.
        Step = "step",
        /// Half a cosine from `lr` to 0 over all steps.
        Cosine = "cosine",
    }
}

named_enum! {
    /// `train.optimizer`: the update rule, with PyTorch's semantics and defaults.
    OptimizerKind {
        /// `torch.optim.SGD`: `momentum`, `nesterov` and L2 `weight_decay`.
        Sgd = "sgd",
        /// `torch.optim.Adam`: `betas`, `eps` and L2 `weight_decay` (added to the gradient).
        Adam = "adam",
        /// `torch.optim.AdamW`: `betas`, `eps` and decoupled `weight_decay` (the weights shrink
        /// by lr · weight_decay before each update).
        Adamw = "adamw",
    }
}

impl OptimizerKind {
    /// Left out of keys at its default, so that keys made before it existed hold.
    pub fn is_sgd(&self) -> bool {
        *self == OptimizerKind::Sgd
    }

    /// The `[train]` keys only this optimizer reads (besides `lr` and `weight_decay`, which all
    /// read): setting one in an experiment that uses another optimizer is refused.
    pub fn own_keys(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd => &["momentum", "nesterov"],
            OptimizerKind::Adam | OptimizerKind::Adamw => &["betas", "eps"],
        }
    }
}

named_enum! {
    /// One of `reset.modes`.
    ResetMode {
        /// One unit back to an earlier checkpoint (epoch 0 is its initial value).
        Reinit = "reinit",
        /// One unit to a fresh draw from its initial distribution.
        Rerandomize = "rerandomize",
        /// A set of units back to a checkpoint together: the configured sets, the built-in ones
        /// and, with `reinit`, the set of units robust on their own at τ = 0 (`robust`).
        Joint = "joint",
        /// Every joint set to fresh draws from its units' initial distributions together.
        JointRerandomize = "joint-rerandomize",
        /// The units in order of their own damage at τ = 0 (least first), re-initialized to τ = 0
        /// cumulatively (`first-1`, `first-2`, …): where the network breaks. Needs `reinit`.
        Growth = "growth",
    }
}

/// The `mode` column of `results.parquet` and `summary.parquet`: the trained network itself, or
/// one of the resets. Tables are read back into it, so a mode no code knows is refused where it
/// is read, and a new [`ResetMode`] fails to compile wherever rows are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowMode {
    Baseline,
    Reset(ResetMode),
}

impl RowMode {
    pub const BASELINE: &'static str = "baseline";

    /// Its name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            RowMode::Baseline => RowMode::BASELINE,
            RowMode::Reset(mode) => mode.name(),
        }
    }
}

impl FromStr for RowMode {
    type Err = String;
    fn from_str(s: &str) -> Result<RowMode, String> {
        if s == RowMode::BASELINE {
            return Ok(RowMode::Baseline);
        }
        s.parse::<ResetMode>()
            .map(RowMode::Reset)
            .map_err(|_| format!("unknown mode '{s}' (known: {}, {})", RowMode::BASELINE, ResetMode::names()))
    }
}

impl fmt::Display for RowMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

named_enum! {
    /// One of `reset.bn_stats`: what happens to a reset unit's BatchNorm running statistics.
    BnStats {
        /// Reset with the unit, from the same source.
        WithLayer = "with-layer",
        /// Kept at their trained values.
        Keep = "keep",
        /// Recomputed on training batches after the reset.
        Recalibrate = "recalibrate",
    }
}

/// The compute path of fully connected networks (`train.compute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComputePath {
    /// Forward, backward and SGD on f32 buffers with layerlab's own kernels, without candle's
    /// autograd (`crates/layerlab/src/mlp.rs` for fully connected networks, `cnn.rs` for
    /// convolutional ones; on the CPU).
    #[default]
    Fast,
    /// candle's autograd (with layerlab's kernels inside it), to cross-check the fast paths.
    Autograd,
}

impl ComputePath {
    pub fn is_fast(&self) -> bool {
        *self == ComputePath::Fast
    }
}

named_enum! {
    /// A dataset layerlab knows: the catalogue of names, classes, shapes and raw files.
    Dataset {
        Mnist = "mnist",
        FashionMnist = "fashion-mnist",
        Cifar10 = "cifar10",
    }
}

/// The four IDX files of MNIST and Fashion-MNIST: train images, train labels, test images, test labels.
pub const IDX_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// sha256 of the raw (uncompressed) MNIST files, in the order of [`IDX_FILES`] (`docs/datasets.md`).
const MNIST_SHA256: [&str; 4] = [
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
];
/// sha256 of the raw Fashion-MNIST files, in the order of [`IDX_FILES`] (`docs/datasets.md`).
const FASHION_SHA256: [&str; 4] = [
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
];
/// Published md5 of `cifar-10-binary.tar.gz` (its raw files have no pinned checksums).
pub const CIFAR_ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

impl Dataset {
    pub fn classes(self) -> usize {
        match self {
            Dataset::Mnist | Dataset::FashionMnist | Dataset::Cifar10 => 10,
        }
    }

    /// One image: [channels, height, width].
    pub fn image_shape(self) -> [usize; 3] {
        match self {
            Dataset::Mnist | Dataset::FashionMnist => [1, 28, 28],
            Dataset::Cifar10 => [3, 32, 32],
        }
    }

    /// The canonical download location, then mirrors (`docs/datasets.md`).
    pub fn default_urls(self) -> &'static [&'static str] {
        match self {
            Dataset::Mnist => &["http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"],
            Dataset::FashionMnist => &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
            Dataset::Cifar10 => &["https://www.cs.toronto.edu/~kriz/"],
        }
    }

    /// The pinned sha256 of the raw IDX files, or `None` for CIFAR-10, which has none.
    pub fn pinned_sha256(self) -> Option<&'static [&'static str; 4]> {
        match self {
            Dataset::Mnist => Some(&MNIST_SHA256),
            Dataset::FashionMnist => Some(&FASHION_SHA256),
            Dataset::Cifar10 => None,
        }
    }
}

/// A dataset the user brings: `[[dataset]]` in the pipeline file, train and test files each
/// holding `images` u8 [N, C, H, W] and `labels` [N], as `.npz` arrays or in layerlab's canonical
/// safetensors form. fetch-data checks them and stores them as it stores a fetched dataset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OwnDataset {
    pub name: String,
    pub classes: usize,
    /// Resolved against the pipeline file's folder.
    pub train: PathBuf,
    pub test: PathBuf,
}

/// The data an experiment trains and tests on: a dataset of the catalogue, or the user's own.
/// Written into keys, tables and messages as its name alone, so keys made when `dataset` was a
/// catalogue name still hold; an own dataset's files reach the keys through fetch-data's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataSource {
    Catalogue(Dataset),
    Own(Arc<OwnDataset>),
}

impl DataSource {
    pub fn name(&self) -> &str {
        match self {
            DataSource::Catalogue(d) => d.name(),
            DataSource::Own(own) => &own.name,
        }
    }
    pub fn classes(&self) -> usize {
        match self {
            DataSource::Catalogue(d) => d.classes(),
            DataSource::Own(own) => own.classes,
        }
    }
}

impl OwnDataset {
    /// Every dataset name an experiment may use, for messages: the catalogue's, then `own`.
    pub fn names_with_catalogue(own: &[Arc<OwnDataset>]) -> String {
        let mut names: Vec<&str> = Dataset::ALL.iter().map(|d| d.name()).collect();
        names.extend(own.iter().map(|d| d.name.as_str()));
        names.join(", ")
    }
}

impl From<Dataset> for DataSource {
    fn from(d: Dataset) -> DataSource {
        DataSource::Catalogue(d)
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DataSource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for &arch in Arch::ALL {
            let json = serde_json::to_string(&arch).unwrap();
            assert_eq!(json, format!("\"{}\"", arch.name()));
            assert_eq!(serde_json::from_str::<Arch>(&json).unwrap(), arch);
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        }
        for &d in Dataset::ALL {
            assert_eq!(d.name().parse::<Dataset>().unwrap(), d);
        }
        assert_eq!(serde_json::to_string(&BnStats::WithLayer).unwrap(), "\"with-layer\"");
        assert_eq!(serde_json::to_string(&WeightInit::KaimingNormal).unwrap(), "\"kaiming-normal\"");
        let err = "alexnet".parse::<Arch>().unwrap_err();
        assert!(err.contains("alexnet") && err.contains("resnet34"), "{err}");
        let err = serde_json::from_str::<Arch>("7").unwrap_err().to_string();
        assert!(err.contains("invalid type") && err.contains("one of fcn, vgg11"), "{err}");
    }

    #[test]
    fn row_modes_read_back_what_they_write_and_refuse_the_rest() {
        let all = std::iter::once(RowMode::Baseline).chain(ResetMode::ALL.iter().map(|&m| RowMode::Reset(m)));
        for mode in all {
            assert_eq!(mode.name().parse::<RowMode>().unwrap(), mode);
        }
        let err = "reinitialise".parse::<RowMode>().unwrap_err();
        assert!(err.contains("reinitialise") && err.contains("baseline, reinit"), "{err}");
    }
}
