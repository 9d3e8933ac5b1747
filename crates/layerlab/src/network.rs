//! Network definitions (FCN, VGG, ResNet) as layer lists, their units, and their initial
//! weights: what a network is, not how it is computed ([`crate::model`] runs it forward,
//! [`crate::backward`] back).
//!
//! A network is plain data: a list of [`Layer`]s naming the tensors they read, and the list of
//! [`Unit`]s (the study's "layers") that own those tensors. Weights live outside, in a [`State`]
//! (name → tensor, PyTorch state_dict names and layouts), so that the same forward pass serves
//! training (tensors of `Var`s), evaluation and resets (plain tensors swapped by name).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::init::{self, Init};
use crate::random;
use layerlab_pipeline::{Arch, ModelConfig, WeightInit};

/// Weights and buffers by state_dict name.
pub type State = BTreeMap<String, Tensor>;

/// One step of the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    /// Zero padding on every side of H and W.
    Pad(usize),
    Flatten,
    /// `{name}.weight` [out, in] and `{name}.bias` [out].
    Linear {
        name: String,
    },
    /// `{name}.weight` [out, in, k, k] (and `{name}.bias` when `bias`).
    Conv {
        name: String,
        stride: usize,
        padding: usize,
        bias: bool,
    },
    /// `{name}.weight`, `.bias`, `.running_mean`, `.running_var` [channels].
    BatchNorm {
        name: String,
    },
    Relu,
    MaxPool2,
    GlobalAvgPool,
    /// relu(main(x) + shortcut(x)); an empty shortcut is the identity.
    Residual {
        main: Vec<Layer>,
        shortcut: Vec<Layer>,
    },
}

impl Layer {
    /// What error messages call the layer: its tensors' name, or its kind.
    pub fn label(&self) -> String {
        match self {
            Layer::Linear { name } | Layer::Conv { name, .. } | Layer::BatchNorm { name } => name.clone(),
            Layer::Pad(p) => format!("pad {p}"),
            Layer::Flatten => "flatten".into(),
            Layer::Relu => "relu".into(),
            Layer::MaxPool2 => "max-pool".into(),
            Layer::GlobalAvgPool => "global average pool".into(),
            Layer::Residual { main, .. } => {
                format!("residual block from {}", main.first().map_or_else(|| "its input".into(), Layer::label))
            }
        }
    }
}

/// How one tensor of a unit is shaped and drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Trained by the optimizer (BatchNorm running statistics are not).
    pub trainable: bool,
}

/// A unit: one Linear or Conv with its bias and the BatchNorm that directly follows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Position from the input, from 0.
    pub index: usize,
    pub name: String,
    /// `linear` or `conv`.
    pub kind: &'static str,
    /// Index of the top-level layer where this unit's computation starts: the activations
    /// entering that layer do not depend on this unit (prefix reuse).
    pub entry_layer: usize,
    pub tensors: Vec<TensorSpec>,
}

impl Unit {
    /// Number of trainable values.
    pub fn params(&self) -> usize {
        self.tensors.iter().filter(|t| t.trainable).map(|t| t.shape.iter().product::<usize>()).sum()
    }
    pub fn has_batch_norm(&self) -> bool {
        self.tensors.iter().any(|t| t.name.ends_with(".running_mean"))
    }
    /// Fresh values for every tensor of the unit, from its initial distributions and one stream
    /// seeded with `seed` (see [`random::init_seed`] and [`random::rerandomize_seed`]).
    pub fn draw(&self, seed: u64, device: &Device) -> Result<State> {
        let mut r = random::rng(seed);
        let mut out = State::new();
        for spec in &self.tensors {
            let n = spec.shape.iter().product();
            let values = init::draw(spec.init, n, &mut r);
            out.insert(spec.name.clone(), Tensor::from_vec(values, spec.shape.clone(), device)?);
        }
        Ok(out)
    }
}

/// A complete network description.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// E.g. `fcn-3x256`, `vgg11-bn-w0.25`.
    pub name: String,
    pub layers: Vec<Layer>,
    pub units: Vec<Unit>,
    /// Input [channels, height, width] before any padding.
    pub input: [usize; 3],
    pub classes: usize,
}

impl Architecture {
    /// Builds the network a model config asks for, for inputs of the given shape.
    pub fn build(cfg: &ModelConfig, input: [usize; 3], classes: usize) -> Result<Architecture> {
        let mut b = Builder::new(cfg, input, classes);
        match cfg.arch {
            Arch::Fcn => b.fcn(cfg.depth as usize, cfg.width as usize),
            Arch::Vgg11 => b.vgg(&[1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg13 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg16 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 4, 0, 8, 8, 8, 0, 8, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg19 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 4, 4, 0, 8, 8, 8, 8, 0, 8, 8, 8, 8, 0], cfg.batch_norm)?,
            Arch::Resnet18 => b.resnet(&[2, 2, 2, 2], Block::Basic)?,
            Arch::Resnet34 => b.resnet(&[3, 4, 6, 3], Block::Basic)?,
            Arch::Resnet50 => b.resnet(&[3, 4, 6, 3], Block::Bottleneck)?,
            Arch::Resnet101 => b.resnet(&[3, 4, 23, 3], Block::Bottleneck)?,
        }
        Ok(b.finish())
    }

    /// The initial weights of the whole network for a training seed.
    pub fn initial_state(&self, training_seed: u64, device: &Device) -> Result<State> {
        let mut state = State::new();
        for unit in &self.units {
            state.extend(unit.draw(random::init_seed(training_seed, &unit.name), device)?);
        }
        Ok(state)
    }

    pub fn unit(&self, name: &str) -> Result<&Unit> {
        self.units.iter().find(|u| u.name == name).with_context(|| {
            let names: Vec<_> = self.units.iter().map(|u| u.name.as_str()).collect();
            format!("no unit named '{name}' in {} (units: {})", self.name, names.join(", "))
        })
    }

    /// Every tensor of the network, in unit order.
    pub fn tensor_specs(&self) -> impl Iterator<Item = (&Unit, &TensorSpec)> {
        self.units.iter().flat_map(|u| u.tensors.iter().map(move |t| (u, t)))
    }

    pub fn spec(&self, tensor: &str) -> Option<&TensorSpec> {
        self.tensor_specs().map(|(_, t)| t).find(|t| t.name == tensor)
    }

    pub fn has_batch_norm(&self) -> bool {
        self.units.iter().any(Unit::has_batch_norm)
    }

    /// Checks that a state holds exactly this network's tensors with the right shapes.
    pub fn check_state(&self, state: &State) -> Result<()> {
        for (_, spec) in self.tensor_specs() {
            let t = state.get(&spec.name).with_context(|| format!("tensor '{}' is missing", spec.name))?;
            if t.dims() != spec.shape.as_slice() {
                bail!("tensor '{}' has shape {:?}, expected {:?}", spec.name, t.dims(), spec.shape);
            }
        }
        if let Some(extra) = state.keys().find(|k| self.spec(k).is_none()) {
            bail!("tensor '{extra}' does not belong to {}", self.name);
        }
        Ok(())
    }
}

/// A ResNet's residual block.
#[derive(Debug, Clone, Copy)]
enum Block {
    /// Two 3×3 convolutions (ResNet-18 and -34).
    Basic,
    /// 1×1 → 3×3 → 1×1, the last with four times the stage's width (ResNet-50 and -101).
    Bottleneck,
}

/// Collects layers and units while a network is described.
struct Builder {
    init: WeightInit,
    input: [usize; 3],
    classes: usize,
    pad: usize,
    width_mult: f64,
    name: String,
    layers: Vec<Layer>,
    units: Vec<Unit>,
}

impl Builder {
    fn new(cfg: &ModelConfig, input: [usize; 3], classes: usize) -> Builder {
        let pad = (cfg.pad_to as usize).saturating_sub(input[1].max(input[2])) / 2;
        Builder {
            init: cfg.init,
            input,
            classes,
            pad,
            width_mult: cfg.width_mult,
            name: String::new(),
            layers: Vec::new(),
            units: Vec::new(),
        }
    }

    fn channels(&self, base: usize) -> usize {
        ((base as f64 * self.width_mult).round() as usize).max(1)
    }

    fn new_unit(&mut self, name: &str, kind: &'static str, entry_layer: usize) -> &mut Unit {
        let index = self.units.len();
        self.units.push(Unit { index, name: name.into(), kind, entry_layer, tensors: Vec::new() });
        self.units.last_mut().expect("just pushed")
    }

    fn linear_layer(&mut self, unit: &str, tensor_prefix: &str, fan_in: usize, out: usize) -> Layer {
        let (w, b) = init::weight_and_bias(self.init, fan_in);
        let entry = self.layers.len();
        let u = self.new_unit(unit, "linear", entry);
        u.tensors.push(spec(format!("{tensor_prefix}.weight"), vec![out, fan_in], w, true));
        u.tensors.push(spec(format!("{tensor_prefix}.bias"), vec![out], b, true));
        Layer::Linear { name: tensor_prefix.into() }
    }

    /// A conv unit (entry at the current top-level layer), returning its conv layer.
    #[allow(clippy::too_many_arguments)] // a convolution's shape: each argument is one of its sizes
    fn conv_layer(
        &mut self,
        unit: &str,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
    ) -> Layer {
        let fan_in = cin * k * k;
        let (w, b) = init::weight_and_bias(self.init, fan_in);
        let entry = self.layers.len();
        let u = self.new_unit(unit, "conv", entry);
        u.tensors.push(spec(format!("{prefix}.weight"), vec![cout, cin, k, k], w, true));
        if bias {
            u.tensors.push(spec(format!("{prefix}.bias"), vec![cout], b, true));
        }
        Layer::Conv { name: prefix.into(), stride, padding: k / 2, bias }
    }

    /// A BatchNorm owned by the last unit.
    fn bn_layer(&mut self, prefix: &str, channels: usize) -> Layer {
        let u = self.units.last_mut().expect("a BatchNorm follows a unit");
        u.tensors.push(spec(format!("{prefix}.weight"), vec![channels], Init::Const(1.0), true));
        u.tensors.push(spec(format!("{prefix}.bias"), vec![channels], Init::Const(0.0), true));
        u.tensors.push(spec(format!("{prefix}.running_mean"), vec![channels], Init::Const(0.0), false));
        u.tensors.push(spec(format!("{prefix}.running_var"), vec![channels], Init::Const(1.0), false));
        Layer::BatchNorm { name: prefix.into() }
    }

    fn fcn(&mut self, depth: usize, width: usize) {
        self.name = format!("fcn-{depth}x{width}");
        self.layers.push(Layer::Flatten);
        let mut fan_in: usize = self.input.iter().product();
        for i in 1..=depth + 1 {
            let out = if i <= depth { width } else { self.classes };
            let name = format!("fc{i}");
            let l = self.linear_layer(&name, &name, fan_in, out);
            self.layers.push(l);
            if i <= depth {
                self.layers.push(Layer::Relu);
            }
            fan_in = out;
        }
    }

    fn spatial(&self) -> usize {
        self.input[1].max(self.input[2]) + 2 * self.pad
    }

    /// `plan`: channel multiples of 64, with 0 for a 2×2 max-pool (torchvision's cfg lists).
    fn vgg(&mut self, plan: &[usize], batch_norm: bool) -> Result<()> {
        let depth = plan.iter().filter(|&&c| c > 0).count() + 3;
        self.name = format!("vgg{depth}{}-w{}", if batch_norm { "-bn" } else { "" }, self.width_mult);
        if self.pad > 0 {
            self.layers.push(Layer::Pad(self.pad));
        }
        let mut size = self.spatial();
        let mut cin = self.input[0];
        // torchvision numbers every module inside `features`, ReLU and pools included.
        let mut module = 0;
        let mut conv = 0;
        for &m in plan {
            if m == 0 {
                if size < 2 {
                    bail!("input too small for {} max-pools", plan.iter().filter(|&&c| c == 0).count());
                }
                size /= 2;
                self.layers.push(Layer::MaxPool2);
                module += 1;
                continue;
            }
            conv += 1;
            let cout = self.channels(64 * m);
            let l = self.conv_layer(&format!("conv{conv}"), &format!("features.{module}"), cin, cout, 3, 1, true);
            self.layers.push(l);
            module += 1;
            if batch_norm {
                let l = self.bn_layer(&format!("features.{module}"), cout);
                self.layers.push(l);
                module += 1;
            }
            self.layers.push(Layer::Relu);
            module += 1;
            cin = cout;
        }
        self.layers.push(Layer::Flatten);
        let l = self.linear_layer("fc", "classifier", cin * size * size, self.classes);
        self.layers.push(l);
        Ok(())
    }

    /// ResNet with the CIFAR stem (one 3×3 convolution, no max-pool) and `blocks` residual blocks
    /// per stage, of `block`'s kind.
    fn resnet(&mut self, blocks: &[usize], block: Block) -> Result<()> {
        let convs_per_block = match block {
            Block::Basic => 2,
            Block::Bottleneck => 3,
        };
        let depth = convs_per_block * blocks.iter().sum::<usize>() + 2;
        self.name = format!("resnet{depth}-w{}", self.width_mult);
        if self.pad > 0 {
            self.layers.push(Layer::Pad(self.pad));
        }
        let stem = self.channels(64);
        let l = self.conv_layer("conv1", "conv1", self.input[0], stem, 3, 1, false);
        self.layers.push(l);
        let l = self.bn_layer("bn1", stem);
        self.layers.push(l);
        self.layers.push(Layer::Relu);
        let mut cin = stem;
        let mut size = self.spatial();
        for (s, &count) in blocks.iter().enumerate() {
            // A bottleneck's inner width is the stage's base width; its output is four times that.
            let width = self.channels(64 << s);
            let cout = match block {
                Block::Basic => width,
                Block::Bottleneck => self.channels(256 << s),
            };
            for b in 0..count {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                if stride == 2 {
                    if size < 2 {
                        bail!("input too small for ResNet's strides");
                    }
                    size = size.div_ceil(2);
                }
                let p = format!("layer{}.{b}", s + 1);
                // torchvision's layout: (kernel, output channels, stride) of conv1, conv2, …;
                // a bottleneck strides on its 3×3 (ResNet v1.5).
                let convs: Vec<(usize, usize, usize)> = match block {
                    Block::Basic => vec![(3, cout, stride), (3, cout, 1)],
                    Block::Bottleneck => vec![(1, width, 1), (3, width, stride), (1, cout, 1)],
                };
                let mut main = Vec::new();
                let mut c = cin;
                for (i, &(k, out, conv_stride)) in convs.iter().enumerate() {
                    if i > 0 {
                        main.push(Layer::Relu);
                    }
                    let name = format!("{p}.conv{}", i + 1);
                    main.push(self.conv_layer(&name, &name, c, out, k, conv_stride, false));
                    main.push(self.bn_layer(&format!("{p}.bn{}", i + 1), out));
                    c = out;
                }
                let mut shortcut = Vec::new();
                if stride != 1 || cin != cout {
                    shortcut.push(self.conv_layer(
                        &format!("{p}.shortcut"),
                        &format!("{p}.shortcut.0"),
                        cin,
                        cout,
                        1,
                        stride,
                        false,
                    ));
                    shortcut.push(self.bn_layer(&format!("{p}.shortcut.1"), cout));
                }
                self.layers.push(Layer::Residual { main, shortcut });
                cin = cout;
            }
        }
        self.layers.push(Layer::GlobalAvgPool);
        let l = self.linear_layer("fc", "fc", cin, self.classes);
        self.layers.push(l);
        Ok(())
    }

    fn finish(self) -> Architecture {
        Architecture {
            name: self.name,
            layers: self.layers,
            units: self.units,
            input: self.input,
            classes: self.classes,
        }
    }
}

fn spec(name: String, shape: Vec<usize>, init: Init, trainable: bool) -> TensorSpec {
    TensorSpec { name, shape, init, trainable }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A model config for `arch`: depth 3, width 256, widths ×0.25, BatchNorm, padded to 32.
    pub(crate) fn cfg(arch: &str) -> ModelConfig {
        ModelConfig {
            arch: arch.parse().unwrap(),
            depth: 3,
            width: 256,
            width_mult: 0.25,
            batch_norm: true,
            pad_to: 32,
            init: WeightInit::Pytorch,
        }
    }

    #[test]
    fn fcn_units_and_shapes_follow_the_paper() {
        let mut c = cfg("fcn");
        c.pad_to = 0;
        let a = Architecture::build(&c, [1, 28, 28], 10).unwrap();
        let names: Vec<_> = a.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["fc1", "fc2", "fc3", "fc4"]);
        assert_eq!(a.units[0].tensors[0].shape, vec![256, 784]);
        assert_eq!(a.units[3].tensors[0].shape, vec![10, 256]);
        assert_eq!(a.units.iter().map(Unit::params).sum::<usize>(), 784 * 256 + 256 + 2 * (256 * 256 + 256) + 2570);
    }

    #[test]
    fn vgg11_has_eight_convs_with_torchvision_names() {
        let a = Architecture::build(&cfg("vgg11"), [1, 28, 28], 10).unwrap();
        let names: Vec<_> = a.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "conv8", "fc"]);
        let channels: Vec<_> = a.units[..8].iter().map(|u| u.tensors[0].shape[0]).collect();
        assert_eq!(channels, [16, 32, 64, 64, 128, 128, 128, 128]);
        assert_eq!(a.units[0].tensors[0].name, "features.0.weight");
        assert_eq!(a.units[0].tensors[2].name, "features.1.weight");
        assert_eq!(a.units[1].tensors[0].name, "features.4.weight");
        assert_eq!(a.units[8].tensors[0].shape, vec![10, 128]);
        assert!(a.units[0].has_batch_norm());
    }

    #[test]
    fn resnet18_units_include_shortcuts() {
        let a = Architecture::build(&cfg("resnet18"), [1, 28, 28], 10).unwrap();
        assert_eq!(a.units.len(), 1 + 16 + 3 + 1);
        let u = a.unit("layer2.0.shortcut").unwrap();
        assert_eq!(u.tensors[0].name, "layer2.0.shortcut.0.weight");
        assert_eq!(u.tensors[0].shape, vec![32, 16, 1, 1]);
        assert_eq!(a.unit("fc").unwrap().tensors[0].shape, vec![10, 128]);
        assert!(a.unit("layer9.0.conv1").is_err());
    }

    /// torchvision's ResNet-50 at width ×0.25 with the CIFAR stem: three convolutions per block
    /// (1×1, 3×3 with the stage's stride, 1×1 to four times the width), a projection in every
    /// stage's first block (layer1's too: 16 → 64 channels), and the parameter count worked out
    /// by hand from those shapes.
    #[test]
    fn resnet50_has_bottleneck_blocks_with_torchvision_names() {
        let a = Architecture::build(&cfg("resnet50"), [1, 28, 28], 10).unwrap();
        assert_eq!(a.name, "resnet50-w0.25");
        assert_eq!(a.units.len(), 1 + 16 * 3 + 4 + 1);
        let shape = |unit: &str| a.unit(unit).unwrap().tensors[0].shape.clone();
        assert_eq!(shape("conv1"), [16, 1, 3, 3]);
        assert_eq!(shape("layer1.0.conv1"), [16, 16, 1, 1]);
        assert_eq!(shape("layer1.0.conv2"), [16, 16, 3, 3]);
        assert_eq!(shape("layer1.0.conv3"), [64, 16, 1, 1]);
        assert_eq!(shape("layer1.0.shortcut"), [64, 16, 1, 1]);
        assert_eq!(shape("layer1.1.conv1"), [16, 64, 1, 1]);
        assert_eq!(shape("layer2.0.conv1"), [32, 64, 1, 1]);
        assert_eq!(shape("layer4.2.conv3"), [512, 128, 1, 1]);
        assert_eq!(shape("fc"), [10, 512]);
        assert!(a.unit("layer1.1.shortcut").is_err() && a.unit("layer3.5.conv3").is_ok());
        let conv2 = a.unit("layer2.0.conv2").unwrap();
        assert_eq!(
            conv2.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            [
                "layer2.0.conv2.weight",
                "layer2.0.bn2.weight",
                "layer2.0.bn2.bias",
                "layer2.0.bn2.running_mean",
                "layer2.0.bn2.running_var",
            ]
        );
        // The stride sits on the 3×3 of a stage's first block, and on its projection.
        let Layer::Residual { main, shortcut } = &a.layers[a.unit("layer2.0.conv1").unwrap().entry_layer] else {
            panic!("layer2.0 is not a residual block")
        };
        let strides: Vec<usize> = main
            .iter()
            .chain(shortcut)
            .filter_map(|l| if let Layer::Conv { stride, .. } = l { Some(*stride) } else { None })
            .collect();
        assert_eq!(strides, [1, 2, 1, 2]);
        // Per stage (width w, output 4w, input c): the first block's w·c + 9w² + 4w² + 4w·c and
        // each other's 4w² + 9w² + 4w², plus BatchNorm's 2 per channel; the stem and fc.
        let mut params = 16 * 9 + 2 * 16 + 512 * 10 + 10;
        let mut c = 16;
        for (w, blocks) in [(16, 3), (32, 4), (64, 6), (128, 3)] {
            params += w * c + 9 * w * w + 4 * w * w + 4 * w * c + 2 * (w + w + 4 * w + 4 * w);
            params += (blocks - 1) * (4 * w * w + 9 * w * w + 4 * w * w + 2 * (w + w + 4 * w));
            c = 4 * w;
        }
        assert_eq!(a.units.iter().map(Unit::params).sum::<usize>(), params);
        let deep = Architecture::build(&cfg("resnet101"), [1, 28, 28], 10).unwrap();
        assert_eq!((deep.name.as_str(), deep.units.len()), ("resnet101-w0.25", 1 + 33 * 3 + 4 + 1));
    }
}
