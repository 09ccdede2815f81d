//! Backward passes of the custom operations: the `Autodiff<B>` implementation of
//! [`KilnKernels`]. Each forward keeps what its backward kernel needs (inputs, and the
//! log-sum-exp or rstd the forward kernel saved) and registers one backward step.
//! The `*_backward` methods themselves are not differentiated again (no second order).

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend};

use super::extension::KilnKernels;

type Inner<B> = FloatTensor<B>;

/// Registers `grad` for `parent` if that parent needs a gradient.
macro_rules! register {
    ($grads:expr, $parent:expr, $grad:expr) => {
        if let Some(node) = $parent {
            $grads.register::<B>(node.id, $grad);
        }
    };
}

impl<B: Backend + KilnKernels, C: CheckpointStrategy> KilnKernels for Autodiff<B, C> {
    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBackward;

        impl<B: Backend + KilnKernels> Backward<B, 2> for LinearBackward {
            type State = (Inner<B>, Inner<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dx, dw) = B::linear_backward(x, weight, dy);
                let [px, pw] = &ops.parents;
                register!(grads, px, dx);
                register!(grads, pw, dw);
            }
        }

        let guards = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        match LinearBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            // Training takes the matmul whatever the number of rows, so that a data-parallel
            // worker's half batch computes each row as one process computes it.
            OpsKind::Tracked(prep) => {
                let y = <B as KilnKernels>::linear_matmul(x.clone(), weight.clone());
                prep.finish((x, weight), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as KilnKernels>::linear(x, weight)),
        }
    }

    fn linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::linear_backward(Self::inner(x), Self::inner(weight), Self::inner(dy));
        (Self::from_inner(dx), Self::from_inner(dw))
    }

    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct FlashAttentionBackward;

        type State<B> = (
            Inner<B>,
            Inner<B>,
            Inner<B>,
            Inner<B>,
            Inner<B>,
            IntTensor<B>,
            f32,
        );

        impl<B: Backend + KilnKernels> Backward<B, 3> for FlashAttentionBackward {
            type State = State<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (q, k, v, out, lse, segments, scale) = ops.state;
                let d_out = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::flash_attention_backward(q, k, v, out, lse, d_out, segments, scale);
                let [pq, pk, pv] = &ops.parents;
                register!(grads, pq, dq);
                register!(grads, pk, dk);
                register!(grads, pv, dv);
            }
        }

        let guards = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let segments = Self::int_inner(segments);
        let (out, lse) =
            B::flash_attention(q.clone(), k.clone(), v.clone(), segments.clone(), scale);
        let out = match FlashAttentionBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((q, k, v, out.clone(), lse.clone(), segments, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, Self::from_inner(lse))
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        segments: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::flash_attention_backward(
            Self::inner(q),
            Self::inner(k),
            Self::inner(v),
            Self::inner(out),
            Self::inner(lse),
            Self::inner(d_out),
            Self::int_inner(segments),
            scale,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: Backend + KilnKernels> Backward<B, 2> for RmsNormBackward {
            type State = (Inner<B>, Inner<B>, Inner<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight, rstd) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dx, dw) = B::rms_norm_backward(x, weight, rstd, dy);
                let [px, pw] = &ops.parents;
                register!(grads, px, dx);
                register!(grads, pw, dw);
            }
        }

        let guards = [x.node(), weight.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let (y, rstd) = B::rms_norm(x.clone(), weight.clone(), eps);
        let y = match RmsNormBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight, rstd.clone()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(rstd))
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::rms_norm_backward(
            Self::inner(x),
            Self::inner(weight),
            Self::inner(rstd),
            Self::inner(dy),
        );
        (Self::from_inner(dx), Self::from_inner(dw))
    }

    fn rope(
        x: FloatTensor<Self>,
        positions: IntTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RopeBackward;

        impl<B: Backend + KilnKernels> Backward<B, 1> for RopeBackward {
            type State = (IntTensor<B>, Inner<B>, Inner<B>, bool);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (positions, cos, sin, inverse) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                // A rotation's transpose is the opposite rotation.
                let dx = B::rope(dy, positions, cos, sin, !inverse);
                register!(grads, &ops.parents[0], dx);
            }
        }

        // The tables are constants: no gradient flows into them.
        let guards = [x.node()];
        let x = x.into_primitive();
        let positions = Self::int_inner(positions);
        let (cos, sin) = (Self::inner(cos), Self::inner(sin));
        let y = B::rope(x, positions.clone(), cos.clone(), sin.clone(), inverse);
        match RopeBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((positions, cos, sin, inverse), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;

        impl<B: Backend + KilnKernels> Backward<B, 2> for SwigluBackward {
            type State = (Inner<B>, Inner<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (gate, up) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (d_gate, d_up) = B::swiglu_backward(gate, up, dy);
                let [pg, pu] = &ops.parents;
                register!(grads, pg, d_gate);
                register!(grads, pu, d_up);
            }
        }

        let guards = [gate.node(), up.node()];
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        let y = B::swiglu(gate.clone(), up.clone());
        match SwigluBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((gate, up), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (d_gate, d_up) =
            B::swiglu_backward(Self::inner(gate), Self::inner(up), Self::inner(dy));
        (Self::from_inner(d_gate), Self::from_inner(d_up))
    }

    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl<B: Backend + KilnKernels> Backward<B, 1> for CrossEntropyBackward {
            type State = (Inner<B>, IntTensor<B>, Inner<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (logits, targets, lse) = ops.state;
                let d_loss = grads.consume::<B>(&ops.node);
                let d_logits = B::cross_entropy_backward(logits, targets, lse, d_loss);
                register!(grads, &ops.parents[0], d_logits);
            }
        }

        let guards = [logits.node()];
        let logits = logits.into_primitive();
        let targets = Self::int_inner(targets);
        let (loss, lse) = B::cross_entropy(logits.clone(), targets.clone());
        let loss = match CrossEntropyBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, targets, lse.clone()), loss),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        };
        (loss, Self::from_inner(lse))
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::cross_entropy_backward(
            Self::inner(logits),
            Self::int_inner(targets),
            Self::inner(lse),
            Self::inner(d_loss),
        ))
    }
}
