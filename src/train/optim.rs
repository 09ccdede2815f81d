//! AdamW with decoupled weight decay, global-norm gradient clipping, gradient accumulation and
//! the cosine learning-rate schedule of the Llama 2 recipe (sec. 2.2).
//!
//! Written here rather than taken from burn-optim because the recipe clips the *global*
//! gradient norm (burn clips each tensor on its own) and because resuming needs the moments
//! keyed by parameter name (burn keys them by ids that a reload does not keep).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::config::OptimConfig;
use crate::interop::checkpoint::NamedTensor;
use crate::interop::params::{self, PathTracker};

/// Learning rate of optimizer step `step` (0-based) of `max_steps`: linear warm-up to the peak
/// over `warmup_steps`, then cosine decay to `min_lr_ratio * peak` at the last step.
pub fn learning_rate(config: &OptimConfig, step: u64, max_steps: u64) -> f64 {
    let peak = config.lr;
    let floor = peak * config.min_lr_ratio;
    if step < config.warmup_steps {
        return peak * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let decay_steps = max_steps.saturating_sub(config.warmup_steps + 1);
    if decay_steps == 0 {
        return floor;
    }
    let progress = ((step - config.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Adds the gradients of `next` into `sum`, parameter by parameter.
pub fn accumulate<M: Module>(
    model: &M,
    sum: GradientsParams,
    next: GradientsParams,
) -> GradientsParams {
    struct Adder {
        sum: GradientsParams,
        next: GradientsParams,
    }
    impl ModuleVisitor for Adder {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.next.remove::<D>(param.id) {
                let total = match self.sum.remove::<D>(param.id) {
                    Some(s) => s + g,
                    None => g,
                };
                self.sum.register(param.id, total);
            }
        }
    }
    let mut adder = Adder { sum, next };
    model.visit(&mut adder);
    adder.sum
}

/// L2 norm of all gradients taken together.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct SquareSum<'a> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for SquareSum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.parts.push(g.square().sum());
            }
        }
    }
    let mut sums = SquareSum {
        grads,
        parts: Vec::new(),
    };
    model.visit(&mut sums);
    if sums.parts.is_empty() {
        return 0.0;
    }
    let total: f32 = Tensor::cat(sums.parts, 0).sum().into_scalar();
    (total as f64).sqrt()
}

/// First and second moments of one parameter, flattened.
struct Moments {
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

pub struct AdamW {
    pub config: OptimConfig,
    /// Updates applied so far (the `t` of the bias corrections).
    pub steps_taken: u64,
    moments: HashMap<String, Moments>,
}

/// What one optimizer step did.
pub struct StepReport {
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(config: OptimConfig) -> Self {
        Self {
            config,
            steps_taken: 0,
            moments: HashMap::new(),
        }
    }

    /// Clips `grads` to the global norm `config.grad_clip` and applies one AdamW update at
    /// learning rate `lr`. Weight decay applies to matrices (projections, embeddings), not to
    /// the norm gains.
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: GradientsParams,
        lr: f64,
    ) -> (M, StepReport) {
        self.step_scaled(model, grads, lr, 1.0)
    }

    /// [`AdamW::step`] for gradients that are `1 / scale` times the true ones (sums over the
    /// counted tokens of a step, `scale` being one over their count): the scale is folded into
    /// the clipping factor, so normalising costs no pass over the gradients.
    pub fn step_scaled<M: Module>(
        &mut self,
        model: M,
        grads: GradientsParams,
        lr: f64,
        scale: f64,
    ) -> (M, StepReport) {
        let grad_norm = global_grad_norm(&model, &grads) * scale;
        let clip = self.config.grad_clip;
        let grad_scale = scale
            * if clip > 0.0 && grad_norm > clip {
                clip / (grad_norm + 1e-6)
            } else {
                1.0
            };
        self.steps_taken += 1;
        let t = self.steps_taken as i32;
        let c = &self.config;
        let mut update = Update {
            path: PathTracker::default(),
            grads,
            moments: &mut self.moments,
            hyper: Hyper {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                lr,
                decay: c.weight_decay,
                grad_scale,
                bias_correction1: 1.0 - c.beta1.powi(t),
                bias_correction2: 1.0 - c.beta2.powi(t),
            },
        };
        let model = model.map(&mut update);
        (model, StepReport { grad_norm })
    }

    /// The moments as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`), each in its
    /// parameter's shape, for checkpoints.
    pub fn export<M: Module>(&self, model: &M) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for p in params::list(model) {
            let Some(m) = self.moments.get(&p.name) else {
                continue;
            };
            for (suffix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
                out.push(NamedTensor {
                    name: format!("{}.{suffix}", p.name),
                    shape: p.shape.clone(),
                    values: t.to_data().try_into_vec_as::<f32>().expect("f32 data"),
                });
            }
        }
        out
    }

    /// Restores moments saved by [`export`](Self::export) after `steps_taken` updates.
    pub fn import<M: Module>(
        config: OptimConfig,
        model: &M,
        steps_taken: u64,
        tensors: Vec<NamedTensor>,
        source: &Path,
    ) -> Result<Self> {
        let mut by_name: HashMap<String, NamedTensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let device = model.devices().first().cloned().unwrap_or_default().inner();
        let mut moments = HashMap::new();
        for p in params::list(model) {
            let mut take = |suffix: &str| -> Result<Option<Tensor<1>>> {
                let name = format!("{}.{suffix}", p.name);
                let Some(t) = by_name.remove(&name) else {
                    return Ok(None);
                };
                if t.shape != p.shape {
                    bail!(
                        "{}: tensor {name} has shape {:?}, expected {:?}",
                        source.display(),
                        t.shape,
                        p.shape
                    );
                }
                let n = t.values.len();
                Ok(Some(Tensor::from_data(
                    TensorData::new(t.values, [n]),
                    &device,
                )))
            };
            match (take("exp_avg")?, take("exp_avg_sq")?) {
                (Some(exp_avg), Some(exp_avg_sq)) => {
                    moments.insert(
                        p.name.clone(),
                        Moments {
                            exp_avg,
                            exp_avg_sq,
                        },
                    );
                }
                (None, None) if steps_taken == 0 => {}
                _ => bail!(
                    "{}: optimizer state of {} is missing",
                    source.display(),
                    p.name
                ),
            }
        }
        if let Some(extra) = by_name.keys().next() {
            bail!("{}: unexpected tensor {extra}", source.display());
        }
        Ok(Self {
            config,
            steps_taken,
            moments,
        })
    }
}

struct Update<'a> {
    path: PathTracker,
    grads: GradientsParams,
    moments: &'a mut HashMap<String, Moments>,
    /// The step's numbers; `decay` is the matrices' (norm gains take none).
    hyper: Hyper,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, value, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, value, mapper);
        };
        let shape = value.dims();
        let n: usize = shape.iter().product();
        let require_grad = value.is_require_grad();
        let weight = value.inner();
        let grad = grad.reshape([n]);
        let moments = self
            .moments
            .entry(self.path.path())
            .or_insert_with(|| Moments {
                exp_avg: Tensor::zeros([n], &weight.device()),
                exp_avg_sq: Tensor::zeros([n], &weight.device()),
            });
        let hyper = Hyper {
            decay: if D >= 2 { self.hyper.decay } else { 0.0 },
            ..self.hyper
        };
        let mut updated = if on_host(&weight) {
            Tensor::from_inner(update_on_host(weight, grad, moments, &hyper))
        } else {
            Tensor::from_inner(update_with_tensors(weight, grad, moments, &hyper))
        };
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The numbers of one AdamW update.
#[derive(Clone, Copy)]
struct Hyper {
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
    /// Decoupled weight decay of this parameter (0 for norm gains).
    decay: f64,
    grad_scale: f64,
    bias_correction1: f64,
    bias_correction2: f64,
}

/// f32 weights on the CPU device: the update runs as one loop over the host's memory (a
/// dozen tensor operations would each allocate and traverse every parameter; on a 135M
/// model that was 2 s per step, most of it page faults).
fn on_host<const D: usize>(weight: &Tensor<D>) -> bool {
    use burn::backend::DispatchDevice;
    matches!(
        weight.device().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    ) && weight.dtype() == burn::tensor::DType::F32
}

fn update_on_host<const D: usize>(
    weight: Tensor<D>,
    grad: Tensor<1>,
    moments: &mut Moments,
    h: &Hyper,
) -> Tensor<D> {
    let device = weight.device();
    let shape = weight.dims();
    let vec = |t: TensorData| t.try_into_vec::<f32>().expect("f32 data");
    let mut w = vec(weight.into_data());
    let g = vec(grad.into_data());
    let n = g.len();
    let mut m =
        vec(std::mem::replace(&mut moments.exp_avg, Tensor::empty([0], &device)).into_data());
    let mut v =
        vec(std::mem::replace(&mut moments.exp_avg_sq, Tensor::empty([0], &device)).into_data());
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let (scale, eps, lr) = (h.grad_scale as f32, h.eps as f32, h.lr as f32);
    let (bc1, bc2) = (h.bias_correction1 as f32, h.bias_correction2 as f32);
    let keep = (1.0 - h.lr * h.decay) as f32;
    let step = |w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for i in 0..w.len() {
            let g = g[i] * scale;
            m[i] = m[i] * b1 + g * (1.0 - b1);
            v[i] = v[i] * b2 + g * g * (1.0 - b2);
            let denom = (v[i] / bc2).sqrt() + eps;
            w[i] = w[i] * keep - m[i] / bc1 / denom * lr;
        }
    };
    // Memory-bound: split large parameters over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|scope| {
        for (((w, g), m), v) in w
            .chunks_mut(chunk)
            .zip(g.chunks(chunk))
            .zip(m.chunks_mut(chunk))
            .zip(v.chunks_mut(chunk))
        {
            scope.spawn(move || step(w, g, m, v));
        }
    });
    moments.exp_avg = Tensor::from_data(TensorData::new(m, [n]), &device);
    moments.exp_avg_sq = Tensor::from_data(TensorData::new(v, [n]), &device);
    Tensor::from_data(TensorData::new(w, shape), &device)
}

/// The update in tensor operations, for devices whose memory the host cannot loop over.
fn update_with_tensors<const D: usize>(
    weight: Tensor<D>,
    grad: Tensor<1>,
    moments: &mut Moments,
    h: &Hyper,
) -> Tensor<D> {
    let shape = weight.dims();
    let grad = if h.grad_scale != 1.0 {
        grad.mul_scalar(h.grad_scale)
    } else {
        grad
    };
    moments.exp_avg =
        moments.exp_avg.clone().mul_scalar(h.beta1) + grad.clone().mul_scalar(1.0 - h.beta1);
    moments.exp_avg_sq =
        moments.exp_avg_sq.clone().mul_scalar(h.beta2) + grad.square().mul_scalar(1.0 - h.beta2);
    let denom = moments
        .exp_avg_sq
        .clone()
        .div_scalar(h.bias_correction2)
        .sqrt()
        .add_scalar(h.eps);
    let step = (moments.exp_avg.clone().div_scalar(h.bias_correction1) / denom)
        .mul_scalar(h.lr)
        .reshape(shape);
    let decayed = if h.decay > 0.0 {
        weight.mul_scalar(1.0 - h.lr * h.decay)
    } else {
        weight
    };
    decayed - step
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three AdamW updates of a random parameter, on the host loop and with tensor
    /// operations, against an f64 loop of the formulas (relative tolerance 1e-5: f32).
    #[test]
    fn both_update_paths_match_an_f64_reference() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let device = burn::tensor::Device::flex();
        let (rows, cols) = (37, 1 << 11); // more than one host chunk
        let n = rows * cols;
        let w0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let grads: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..n).map(|_| rng.random_range(-2.0..2.0)).collect())
            .collect();
        let c = OptimConfig::default();
        let hyper = |t: i32| Hyper {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            lr: 1e-2,
            decay: c.weight_decay,
            grad_scale: 0.5,
            bias_correction1: 1.0 - c.beta1.powi(t),
            bias_correction2: 1.0 - c.beta2.powi(t),
        };
        let run = |host: bool| -> Vec<f32> {
            let mut w = Tensor::<2>::from_data(TensorData::new(w0.clone(), [rows, cols]), &device);
            let mut m = Moments {
                exp_avg: Tensor::zeros([n], &device),
                exp_avg_sq: Tensor::zeros([n], &device),
            };
            for (t, g) in grads.iter().enumerate() {
                let g = Tensor::<1>::from_data(TensorData::new(g.clone(), [n]), &device);
                let h = hyper(t as i32 + 1);
                w = if host {
                    update_on_host(w, g, &mut m, &h)
                } else {
                    update_with_tensors(w, g, &mut m, &h)
                };
            }
            w.into_data().try_into_vec::<f32>().unwrap()
        };
        let (mut w, mut m, mut v) = (
            w0.iter().map(|&x| x as f64).collect::<Vec<f64>>(),
            vec![0f64; n],
            vec![0f64; n],
        );
        for (t, g) in grads.iter().enumerate() {
            let h = hyper(t as i32 + 1);
            for i in 0..n {
                let g = g[i] as f64 * h.grad_scale;
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
                let step = m[i] / h.bias_correction1 / ((v[i] / h.bias_correction2).sqrt() + h.eps);
                w[i] = w[i] * (1.0 - h.lr * h.decay) - h.lr * step;
            }
        }
        assert!(on_host(&Tensor::<1>::zeros([1], &device)));
        for (name, got) in [("host", run(true)), ("tensors", run(false))] {
            for i in 0..n {
                let err = (got[i] as f64 - w[i]).abs();
                assert!(
                    err <= 1e-5 * w[i].abs().max(1e-2),
                    "{name}[{i}]: {} vs {}",
                    got[i],
                    w[i]
                );
            }
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert!((learning_rate(&c, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 9, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 99, 100) - 0.1).abs() < 1e-12);
        let mid = learning_rate(&c, 10 + 89 / 2, 100);
        assert!((mid - 0.55).abs() < 0.01, "{mid}");
        for s in 10..99 {
            assert!(learning_rate(&c, s + 1, 100) <= learning_rate(&c, s, 100));
        }
    }
}
