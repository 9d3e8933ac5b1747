//! Each of layerlab's CUDA kernels, run on the CPU by the emulation, against the CPU kernel it
//! must agree with: the same bits for the same inputs (the GPU tests check the same on a GPU, where
//! one is lent; these run everywhere, CI included).

use candle_core::{Device, Tensor, Var};
use cuda_emulation as emu;
use layerlab::kernels::pixels::{gather_values, Shift};
use layerlab::kernels::{layers, norm};
use layerlab::optim::{Adam, Optimizer, Sgd, StepAt};
use rand_core::RngCore;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = layerlab::random::rng(seed);
    (0..n).map(|_| rng.next_u32() as f32 / u32::MAX as f32 * 4.0 - 2.0).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The gradient of Σ f(x) · weights with respect to x, through candle's backward pass on the CPU.
fn gradient(x: &Tensor, weights: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Vec<f32> {
    let var = Var::from_tensor(x).unwrap();
    let loss = (f(var.as_tensor()) * weights).unwrap().sum_all().unwrap();
    values(loss.backward().unwrap().get(var.as_tensor()).unwrap())
}

#[test]
fn gather_batch_is_the_cpu_gather() {
    let mut rng = layerlab::random::rng(1);
    let [count, c, h, w, n] = [7usize, 3, 9, 6, 11];
    let images: Vec<u8> = (0..count * c * h * w).map(|_| rng.next_u32() as u8).collect();
    let positions: Vec<u32> = (0..n).map(|_| rng.next_u32() % count as u32).collect();
    let mut shifts: Vec<u32> = (0..n).map(|_| Shift::draw(&mut rng).packed()).collect();
    shifts[0] = Shift { dy: -4, dx: 4, flip: true }.packed();
    shifts[1] = Shift::NONE.packed();
    let mut out = vec![f32::NAN; n * c * h * w];
    emu::for_num_elems(out.len(), || unsafe {
        emu::gather_batch(
            images.as_ptr(),
            positions.as_ptr(),
            shifts.as_ptr(),
            out.as_mut_ptr(),
            n as u32,
            c as u32,
            h as u32,
            w as u32,
        )
    });
    assert_eq!(bits(&out), bits(&gather_values(&images, &positions, &shifts, [c, h, w])));
}

#[test]
fn relu_forward_backward_and_in_place_are_the_cpu_ops() {
    let mut v = random(3000, 2);
    v[0] = -0.0;
    v[1] = 0.0;
    v[2] = f32::NAN;
    let x = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
    let n = v.len() as u32;
    let mut y = vec![0f32; v.len()];
    emu::for_num_elems(v.len(), || unsafe { emu::relu_forward(v.as_ptr(), y.as_mut_ptr(), n) });
    let cpu = values(&layers::relu(&x).unwrap());
    assert_eq!(bits(&y), bits(&cpu));
    let mut in_place = v.clone();
    emu::for_num_elems(v.len(), || unsafe { emu::relu_in_place(in_place.as_mut_ptr(), n) });
    assert_eq!(bits(&in_place), bits(&cpu));

    let g = random(v.len(), 3);
    let weights = Tensor::from_vec(g.clone(), g.len(), &Device::Cpu).unwrap();
    let mut dx = vec![0f32; v.len()];
    emu::for_num_elems(v.len(), || unsafe { emu::relu_backward(y.as_ptr(), g.as_ptr(), dx.as_mut_ptr(), n) });
    assert_eq!(bits(&dx), bits(&gradient(&x, &weights, |t| layers::relu(t).unwrap())));
}

#[test]
fn channel_affine_is_evaluation_batch_norm() {
    let (n, c, hw) = (5usize, 7usize, 13usize);
    let x = random(n * c * hw, 4);
    let (scale, shift) = (random(c, 5), random(c, 6));
    let cpu = |relu| {
        let t = |v: &Vec<f32>, shape: &[usize]| Tensor::from_vec(v.clone(), shape, &Device::Cpu).unwrap();
        values(&norm::affine_no_grad(&t(&x, &[n, c, hw, 1]), &t(&scale, &[c]), &t(&shift, &[c]), relu).unwrap())
    };
    for relu in [false, true] {
        let mut y = vec![0f32; x.len()];
        emu::for_num_elems(x.len(), || unsafe {
            emu::channel_affine(
                x.as_ptr(),
                scale.as_ptr(),
                shift.as_ptr(),
                y.as_mut_ptr(),
                x.len() as u32,
                c as u32,
                hw as u32,
                relu as i32,
            )
        });
        assert_eq!(bits(&y), bits(&cpu(relu)), "relu {relu}");
    }
}

#[test]
fn running_stats_follow_the_cpu_paths_formula() {
    let c = 37;
    let (mean, var, batch) = (random(c, 7), random(c, 8), random(2 * c, 9));
    let momentum = 0.1;
    let mut out = vec![0f32; 2 * c];
    let (keep, take) = ((1.0 - momentum) as f32, momentum as f32);
    emu::for_num_elems(2 * c, || unsafe {
        emu::running_stats(mean.as_ptr(), var.as_ptr(), batch.as_ptr(), out.as_mut_ptr(), c as u32, keep, take)
    });
    // model.rs on the CPU: running · (1 − momentum) + batch · momentum, as candle ops.
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap();
    let update =
        |r: &[f32], b: &[f32]| values(&((t(r) * (1.0 - momentum)).unwrap() + (t(b) * momentum).unwrap()).unwrap());
    assert_eq!(bits(&out[..c]), bits(&update(&mean, &batch[..c])));
    assert_eq!(bits(&out[c..]), bits(&update(&var, &batch[c..])));
}

#[test]
fn sgd_update_all_is_the_cpu_update_for_every_tensor() {
    for nesterov in [false, true] {
        let sizes: Vec<usize> = (0..32).map(|k| 1 + k * 131 % 2000).collect();
        let mut p: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| random(n, 100 + k as u64)).collect();
        let mut m: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| random(n, 200 + k as u64)).collect();
        let g: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| random(n, 300 + k as u64)).collect();
        let (mut p_cpu, mut m_cpu) = (p.clone(), m.clone());
        let sgd = Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov };
        for k in 0..sizes.len() {
            sgd.update_slices(StepAt { lr: 0.05, number: 1 }, &mut p_cpu[k], &mut [&mut m_cpu[k]], &g[k]);
        }
        let mut table = emu::SgdTable { p: [0; 32], m: [0; 32], g: [0; 32], n: [0; 32], count: sizes.len() as u32 };
        for k in 0..sizes.len() {
            table.p[k] = p[k].as_mut_ptr() as u64;
            table.m[k] = m[k].as_mut_ptr() as u64;
            table.g[k] = g[k].as_ptr() as u64;
            table.n[k] = sizes[k] as u32;
        }
        // kernels/cuda.rs's geometry: blocks of 256 along x (at most 1024), one row per tensor.
        let largest = *sizes.iter().max().unwrap();
        let grid = ((largest.div_ceil(256)).min(1024) as u32, sizes.len() as u32);
        emu::launch(grid, 256, || unsafe { emu::sgd_update_all(table, 0.05, 0.9, 5e-4, nesterov as i32) });
        for k in 0..sizes.len() {
            assert_eq!(bits(&p[k]), bits(&p_cpu[k]), "tensor {k}, nesterov {nesterov}: parameters");
            assert_eq!(bits(&m[k]), bits(&m_cpu[k]), "tensor {k}, nesterov {nesterov}: momentum");
        }
    }
}

/// The Adam kernel gives the CPU's bits for every tensor over three steps, under Adam (L2),
/// AdamW (decoupled) and a β₁ below one half (the other branch of PyTorch's lerp).
#[test]
fn adam_update_all_is_the_cpu_update_for_every_tensor() {
    for adam in [
        Adam { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 1e-2, decoupled: false },
        Adam { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 1e-2, decoupled: true },
        Adam { betas: [0.3, 0.9], eps: 1e-6, weight_decay: 0.0, decoupled: false },
    ] {
        let sizes: Vec<usize> = (0..32).map(|k| 1 + k * 131 % 2000).collect();
        let values = |seed: u64| -> Vec<Vec<f32>> {
            sizes.iter().enumerate().map(|(k, &n)| random(n, seed + k as u64)).collect()
        };
        let (mut p, mut m, mut v) = (values(100), vec![], vec![]);
        for &n in &sizes {
            m.push(vec![0f32; n]);
            v.push(vec![0f32; n]);
        }
        let (mut p_cpu, mut m_cpu, mut v_cpu) = (p.clone(), m.clone(), v.clone());
        for number in 1..=3u64 {
            let g = values(300 + 50 * number);
            let at = StepAt { lr: 0.01, number };
            for k in 0..sizes.len() {
                adam.update_slices(at, &mut p_cpu[k], &mut [&mut m_cpu[k], &mut v_cpu[k]], &g[k]);
            }
            let mut table = emu::AdamTable {
                p: [0; 32],
                m: [0; 32],
                v: [0; 32],
                g: [0; 32],
                n: [0; 32],
                count: sizes.len() as u32,
            };
            for k in 0..sizes.len() {
                table.p[k] = p[k].as_mut_ptr() as u64;
                table.m[k] = m[k].as_mut_ptr() as u64;
                table.v[k] = v[k].as_mut_ptr() as u64;
                table.g[k] = g[k].as_ptr() as u64;
                table.n[k] = sizes[k] as u32;
            }
            let s = adam.step(at);
            let largest = *sizes.iter().max().unwrap();
            let grid = ((largest.div_ceil(256)).min(1024) as u32, sizes.len() as u32);
            emu::launch(grid, 256, || unsafe {
                emu::adam_update_all(
                    table,
                    s.shrink,
                    s.step_size,
                    s.bias_correction2_sqrt,
                    s.beta1_weight,
                    s.beta2,
                    s.one_minus_beta2,
                    s.eps,
                    s.weight_decay,
                    s.decoupled as i32,
                    s.l2 as i32,
                    s.lerp_from_start as i32,
                )
            });
        }
        for k in 0..sizes.len() {
            assert_eq!(bits(&p[k]), bits(&p_cpu[k]), "tensor {k} under {adam:?}: parameters");
            assert_eq!(bits(&m[k]), bits(&m_cpu[k]), "tensor {k} under {adam:?}: exp_avg");
            assert_eq!(bits(&v[k]), bits(&v_cpu[k]), "tensor {k} under {adam:?}: exp_avg_sq");
        }
        assert!(p[0] != values(100)[0], "{adam:?}: nothing moved");
    }
}

#[test]
fn max_pool_forward_and_gradient_are_the_cpu_ops() {
    // Odd sizes (the last row and column dropped), ties and a NaN.
    let (n, c, h, w) = (2usize, 3usize, 7usize, 9usize);
    let mut v: Vec<f32> = random(n * c * h * w, 10).iter().map(|x| (x * 4.0).round() / 4.0).collect();
    v[5] = f32::NAN;
    let x = Tensor::from_vec(v.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    let (ho, wo, planes) = (h / 2, w / 2, (n * c) as u32);
    let mut y = vec![0f32; n * c * ho * wo];
    emu::for_num_elems(y.len(), || unsafe {
        emu::max_pool2_forward(v.as_ptr(), y.as_mut_ptr(), planes, h as u32, w as u32)
    });
    assert_eq!(bits(&y), bits(&values(&layers::max_pool2(&x).unwrap())));

    let g = random(y.len(), 11);
    let weights = Tensor::from_vec(g.clone(), (n, c, ho, wo), &Device::Cpu).unwrap();
    let mut dx = vec![0f32; v.len()];
    emu::for_num_elems(v.len(), || unsafe {
        emu::max_pool2_backward(v.as_ptr(), g.as_ptr(), dx.as_mut_ptr(), planes, h as u32, w as u32)
    });
    assert_eq!(bits(&dx), bits(&gradient(&x, &weights, |t| layers::max_pool2(t).unwrap())));
}

#[test]
fn cross_entropy_kernels_are_the_cpu_ops() {
    use layerlab::kernels::loss::{forward_values, grad_values};
    let (n, k) = (37usize, 10usize);
    let x: Vec<f32> = random(n * k, 12).iter().map(|v| v * 3.0).collect();
    let mut rng = layerlab::random::rng(13);
    let labels: Vec<u32> = (0..n).map(|_| rng.next_u32() % k as u32).collect();
    let (mut loss, mut right, mut out) = (vec![0f32; n], vec![0u32; n], vec![0f32; 2]);
    emu::for_num_elems(n, || unsafe {
        emu::cross_entropy_rows(x.as_ptr(), labels.as_ptr(), loss.as_mut_ptr(), right.as_mut_ptr(), n as u32, k as u32)
    });
    emu::launch((1, 1), 1, || unsafe {
        emu::cross_entropy_sum(loss.as_ptr(), right.as_ptr(), out.as_mut_ptr(), n as u32)
    });
    assert_eq!(bits(&out), bits(&forward_values(&x, &labels, k)));
    let g = [0.75f32, 0.0];
    let mut dx = vec![0f32; n * k];
    emu::for_num_elems(n * k, || unsafe {
        emu::cross_entropy_grad(x.as_ptr(), labels.as_ptr(), g.as_ptr(), dx.as_mut_ptr(), n as u32, k as u32)
    });
    assert_eq!(bits(&dx), bits(&grad_values(&x, &labels, k, 0.75)));
}
