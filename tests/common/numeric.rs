//! f64 numerics for tests that check tensors against references: burn's CPU device in f64
//! (for the whole test binary: it is configured before the first tensor), random inputs,
//! relative comparisons, and gradients against central finite differences.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Relative tolerance of autodiff gradients against central differences (step 1e-5, f64).
pub const GRAD_TOL: f64 = 1e-6;

pub fn device() -> Device {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let mut d = Device::flex();
        d.configure(FloatDType::F64)
            .expect("configure f64 before any tensor");
    });
    Device::flex().autodiff()
}

pub fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

pub fn tensor<const D: usize>(values: &[f64], shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), &device())
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().try_into_vec_as::<f64>().unwrap()
}

pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * scale,
            "{what}[{i}]: {a} vs {e} (tolerance {tol} x {scale})"
        );
    }
}

/// Checks d(sum(f(inputs) * probe))/d(input k) from autodiff against central differences on
/// every coordinate of every input.
pub fn check_gradients<const D: usize, const O: usize>(
    inputs: &[(Vec<f64>, [usize; D])],
    f: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
    rng: &mut ChaCha8Rng,
    what: &str,
) {
    let build = |vals: &[Vec<f64>]| -> Vec<Tensor<D>> {
        vals.iter()
            .zip(inputs)
            .map(|(v, (_, shape))| tensor(v, *shape).require_grad())
            .collect()
    };
    let base: Vec<Vec<f64>> = inputs.iter().map(|(v, _)| v.clone()).collect();
    let out_shape = f(build(&base)).dims();
    let probe_vals = randn(rng, out_shape.iter().product());
    let objective = |vals: &[Vec<f64>]| -> (f64, Vec<Tensor<D>>) {
        let ts = build(vals);
        let out = f(ts.clone());
        let probe = tensor(&probe_vals, out_shape);
        let l: f64 = (out * probe).sum().into_scalar();
        (l, ts)
    };
    let ts = build(&base);
    let out = f(ts.clone());
    let grads = (out * tensor(&probe_vals, out_shape)).sum().backward();
    for (k, t) in ts.iter().enumerate() {
        let analytic = values(t.grad(&grads).expect("gradient"));
        let h = 1e-5;
        let numeric: Vec<f64> = (0..base[k].len())
            .map(|i| {
                let mut plus = base.clone();
                plus[k][i] += h;
                let mut minus = base.clone();
                minus[k][i] -= h;
                (objective(&plus).0 - objective(&minus).0) / (2.0 * h)
            })
            .collect();
        assert_close(
            &analytic,
            &numeric,
            GRAD_TOL,
            &format!("{what}: d/d input {k}"),
        );
    }
}
