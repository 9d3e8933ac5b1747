//! Compiles layerlab's CUDA source (`crates/layerlab/src/kernels/cuda.cu`) as C++ for the host,
//! with `src/emulate.cpp` standing in for CUDA's built-ins.

fn main() {
    let source = "../layerlab/src/kernels/cuda.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=src/emulate.cpp");
    cc::Build::new()
        .cpp(true)
        .file("src/emulate.cpp")
        .include("../layerlab/src/kernels")
        // Every rounding as written: no fused multiply-adds, as NVRTC's `__f*_rn` intrinsics.
        .flag("-ffp-contract=off")
        .flag_if_supported("-fno-fast-math")
        .opt_level(1)
        .compile("layerlab_cuda_emulated");
}
