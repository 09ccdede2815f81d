//! One optimizer step, the same for every stage: each micro-batch's loss summed over the
//! tokens (or pairs) it counts, gradients accumulated, a hook where data-parallel training
//! all-reduces them, then the global-norm clip and AdamW on the mean over every counted item.
//!
//! The step's loss is `sum of per-item losses / number of items` over all its micro-batches,
//! not the mean of micro-batch means: a micro-batch of short answers must not weigh as much
//! as one of long answers (the bug TRL and torchtune fixed in trl#2175, torchtune#1875).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

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

/// Where several workers would combine their gradients before the update. A data-parallel
/// run sums the gradients, the loss sums and the counts of every worker here, so the update
/// divides by the count of the whole global batch.
pub trait GradientSync {
    fn all_reduce(&self, step: Accumulated) -> Result<Accumulated>;
}

/// One process on one device: nothing to combine.
pub struct SingleWorker;

impl GradientSync for SingleWorker {
    fn all_reduce(&self, step: Accumulated) -> Result<Accumulated> {
        Ok(step)
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

/// The update of one step: all-reduce through `sync`, then AdamW at `lr` on the gradients of
/// the mean loss, clipped to the global norm. A non-finite loss is an error and leaves the
/// model as it was (the caller saves nothing).
pub fn apply<M: Module>(
    model: M,
    optimizer: &mut AdamW,
    step: Accumulated,
    lr: f64,
    sync: &dyn GradientSync,
) -> Result<(M, StepResult)> {
    let step = sync.all_reduce(step)?;
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
