//! One optimizer step, the same for every stage: each micro-batch's loss summed over the
//! tokens (or pairs) it counts, gradients accumulated, summed over data-parallel workers
//! ([`Accumulated::all_reduce`]), then the global-norm clip and AdamW on the mean over every
//! counted item.
//!
//! The step's loss is `sum of per-item losses / number of items` over all its micro-batches,
//! not the mean of micro-batch means: a micro-batch of short answers must not weigh as much
//! as one of long answers (the bug TRL and torchtune fixed in trl#2175, torchtune#1875).

use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::train::collective::Collective;
use crate::train::optim::{self, AdamW};

/// The loss of one micro-batch, summed (not averaged) over what it counts.
pub struct MicroBatchLoss {
    /// Sum over the counted items of their loss (a scalar with an autodiff graph).
    pub sum: Tensor<1>,
    /// How many items the sum runs over: trained tokens, or preference pairs.
    pub counted: f64,
    /// Tokens the micro-batch processed, padding included (for throughput).
    pub tokens: u64,
}

impl MicroBatchLoss {
    /// From a loss already averaged over `counted` items.
    pub fn from_mean(mean: Tensor<1>, counted: f64, tokens: u64) -> Self {
        Self {
            sum: mean.mul_scalar(counted),
            counted,
            tokens,
        }
    }
}

/// Gradients and loss sums of the micro-batches of one step so far.
#[derive(Default)]
pub struct Accumulated {
    pub grads: Option<GradientsParams>,
    pub loss_sum: f64,
    pub counted: f64,
    pub tokens: u64,
}

impl Accumulated {
    /// Back-propagates one micro-batch's summed loss and adds its gradients.
    pub fn add<M: Module>(&mut self, model: &M, micro: MicroBatchLoss) {
        self.tokens += micro.tokens;
        if micro.counted == 0.0 {
            // Nothing counted (all padding): no gradient, and no 0/0.
            return;
        }
        self.loss_sum += micro.sum.clone().into_scalar::<f32>() as f64;
        self.counted += micro.counted;
        let grads = GradientsParams::from_grads(micro.sum.backward(), model);
        self.grads = Some(match self.grads.take() {
            None => grads,
            Some(sum) => optim::accumulate(model, sum, grads),
        });
    }

    /// The step's loss: the mean over every counted item.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.counted
    }

    /// The gradients of the mean loss by parameter name, on the host (what the update uses,
    /// before clipping): for tests and checks.
    pub fn mean_gradients<M: Module>(
        &self,
        model: &M,
    ) -> Vec<crate::interop::checkpoint::NamedTensor> {
        match &self.grads {
            Some(grads) => {
                crate::interop::params::export_grads(model, grads, (1.0 / self.counted) as f32)
            }
            None => Vec::new(),
        }
    }
}

/// What one optimizer step did.
pub struct StepResult {
    /// Mean loss over every counted item of the step.
    pub loss: f64,
    /// Global gradient norm of the mean loss, before clipping.
    pub grad_norm: f64,
    pub counted: f64,
    pub tokens: u64,
}

/// Gradients are all-reduced on the host in buckets of this many values (16 MiB of `f32`):
/// large enough that MPI's per-call latency is negligible against the transfer, small
/// enough that the staging copies stay a fraction of a large model's gradients.
pub const ALL_REDUCE_BUCKET: usize = 4 << 20;

impl Accumulated {
    /// Sums the gradients, loss sums and counts of every worker, so each holds the step of
    /// the whole global batch. One worker alone returns the step unchanged.
    pub fn all_reduce<M: Module>(self, model: &M, collective: &dyn Collective) -> Result<Self> {
        if collective.world_size() == 1 {
            return Ok(self);
        }
        let mut totals = [self.loss_sum, self.counted, self.tokens as f64];
        collective.all_reduce_sum(&mut totals)?;
        let [loss_sum, counted, tokens] = totals;
        let grads = match collective.nccl_devices() {
            #[cfg(feature = "cuda")]
            Some(devices) => nccl::sum_on_devices(model, self.grads.as_ref(), devices),
            _ => sum_on_host(model, self.grads.as_ref(), collective)?,
        };
        Ok(Self {
            grads: (counted > 0.0).then_some(grads),
            loss_sum,
            counted,
            tokens: tokens as u64,
        })
    }
}

/// Every worker's gradients summed through the host, in buckets: every worker flattens the
/// same parameters in the same order; one without a gradient (every token of its share was
/// padding) contributes zeros.
fn sum_on_host<M: Module>(
    model: &M,
    grads: Option<&GradientsParams>,
    collective: &dyn Collective,
) -> Result<GradientsParams> {
    let mut flat = Flatten {
        grads,
        values: Vec::new(),
    };
    model.visit(&mut flat);
    let mut values = flat.values;
    for bucket in values.chunks_mut(ALL_REDUCE_BUCKET) {
        collective.all_reduce_sum_f32(bucket)?;
    }
    let mut unflatten = Unflatten {
        values: &values,
        grads: GradientsParams::new(),
    };
    model.visit(&mut unflatten);
    Ok(unflatten.grads)
}

/// Gradients summed on the CUDA devices of one process by Burn's NCCL all-reduce: one call
/// per parameter, in visiting order on every worker (NCCL pairs the calls by order).
#[cfg(feature = "cuda")]
mod nccl {
    use anyhow::{Result, bail};
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::distributed::{ReduceOperation, all_reduce};
    use burn::tensor::{Device, Tensor, TensorData};

    use crate::train::collective::Collective;

    /// Every worker's gradients summed on the devices.
    pub fn sum_on_devices<M: Module>(
        model: &M,
        grads: Option<&GradientsParams>,
        devices: &[Device],
    ) -> GradientsParams {
        let mut sum = SumOnDevices {
            grads,
            devices,
            out: GradientsParams::new(),
        };
        model.visit(&mut sum);
        sum.out
    }

    struct SumOnDevices<'a> {
        grads: Option<&'a GradientsParams>,
        devices: &'a [Device],
        out: GradientsParams,
    }

    impl ModuleVisitor for SumOnDevices<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let weight = param.val().inner();
            // A worker without this gradient (all its tokens were padding) adds zeros.
            let grad = self
                .grads
                .and_then(|grads| grads.get::<D>(param.id))
                .unwrap_or_else(|| Tensor::zeros(weight.dims(), &weight.device()));
            let summed = all_reduce(grad, ReduceOperation::Sum, self.devices.to_vec()).resolve();
            self.out.register(param.id, summed);
        }
    }

    /// Before training: each worker all-reduces `rank + 1` on its device and checks the sum
    /// against the host's, so a broken NCCL set-up stops the run with a message instead of
    /// training replicas that drift apart.
    pub fn check(collective: &dyn Collective, device: &Device) -> Result<()> {
        let Some(devices) = collective.nccl_devices() else {
            return Ok(());
        };
        let n = devices.len();
        let mine = Tensor::<1>::from_data(
            TensorData::new(vec![(collective.rank() + 1) as f32; 4], [4]),
            device,
        );
        let sum: Vec<f32> = all_reduce(mine, ReduceOperation::Sum, devices.to_vec())
            .resolve()
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("reading the NCCL check's sum: {e:?}"))?;
        let expected = (n * (n + 1) / 2) as f32;
        if sum.iter().any(|&v| v != expected) {
            bail!(
                "NCCL all-reduce across {n} CUDA devices gave {sum:?}, not {expected}: check the NCCL installation (or train on one device)"
            );
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use nccl::check as check_nccl;

/// The gradients of a model's parameters in visiting order, as one host vector.
struct Flatten<'a> {
    grads: Option<&'a GradientsParams>,
    values: Vec<f32>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match self.grads.and_then(|grads| grads.get::<D>(param.id)) {
            Some(grad) => self.values.extend(
                grad.into_data()
                    .try_into_vec_as::<f32>()
                    .expect("f32 gradient"),
            ),
            None => {
                let n: usize = param.val().dims().iter().product();
                self.values.resize(self.values.len() + n, 0.0);
            }
        }
    }
}

/// [`Flatten`] undone: each parameter's slice of the host vector as its gradient, on the
/// parameter's device.
struct Unflatten<'a> {
    values: &'a [f32],
    grads: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let weight = param.val().inner();
        let shape = weight.dims();
        let n: usize = shape.iter().product();
        let (mine, rest) = self.values.split_at(n);
        self.values = rest;
        let grad = Tensor::<D>::from_data(TensorData::new(mine.to_vec(), shape), &weight.device());
        self.grads.register(param.id, grad);
    }
}

/// The update of one step (all-reduced first, [`Accumulated::all_reduce`], when workers share
/// it): AdamW at `lr` on the gradients of the mean loss, clipped to the global norm. A
/// non-finite loss is an error and leaves the model as it was (the caller saves nothing).
pub fn apply<M: Module>(
    model: M,
    optimizer: &mut AdamW,
    step: Accumulated,
    lr: f64,
) -> Result<(M, StepResult)> {
    let loss = step.mean_loss();
    let Some(grads) = step.grads else {
        bail!("no trained token in this step's micro-batches");
    };
    if !loss.is_finite() {
        bail!("loss is {loss}");
    }
    let (model, report) = optimizer.step_scaled(model, grads, lr, 1.0 / step.counted);
    Ok((
        model,
        StepResult {
            loss,
            grad_norm: report.grad_norm,
            counted: step.counted,
            tokens: step.tokens,
        },
    ))
}
