// The CPU reference ops: forward and backward of every layer of B1, templated on the element type so the
// same code runs in float (the engine's CPU path) and in double (finite-difference gradient checks).
//
// Conventions (the same in kernels/cuda/):
// - Activations are NCHW, contiguous. Convolution weights are OIHW [K, C, R, S]; linear weights [out, in].
// - Every output is assigned (=), never accumulated: gradients of parameters included. A parameter or an
//   activation used twice (the residual branch) has its gradients summed by the caller.
// - A null output pointer means "not needed": that output is neither computed nor written.
// - The multithreaded ops split work over vb::cpu::parallel_for (kernels/cpu/parallel.h); results do not
//   depend on the number of threads (each output element is reduced in a fixed order).
#pragma once
#include <cstdint>

namespace vb::cpu {

struct ConvShape {
  int N, C, H, W;  // input
  int K, R, S;     // output channels, kernel height, kernel width
  int stride, pad;
  int P() const { return (H + 2 * pad - R) / stride + 1; }  // output height
  int Q() const { return (W + 2 * pad - S) / stride + 1; }  // output width
};
// Throws vb::Error naming `what` and every field unless the shape is one a convolution can run (N may be 0).
void check_conv_shape(const ConvShape& s, const char* what);

// C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major; op = transpose when trans is true.
// Blocked and multithreaded. beta == 0 never reads C.
template <class T>
void gemm(bool transA, bool transB, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
          T* C, int ldc);

// y [N,K,P,Q] = conv(x [N,C,H,W], w [K,C,R,S]); no bias.
template <class T>
void conv2d_fwd(const ConvShape& s, const T* x, const T* w, T* y);
// dx [N,C,H,W] from dy [N,K,P,Q] and w.
template <class T>
void conv2d_bwd_data(const ConvShape& s, const T* dy, const T* w, T* dx);
// dw [K,C,R,S] from x and dy.
template <class T>
void conv2d_bwd_filter(const ConvShape& s, const T* x, const T* dy, T* dw);

// Batch norm over N*HW per channel, training mode. Writes y, save_mean [C], save_invstd [C] (1/sqrt(var+eps)
// with the biased variance), and updates running_mean/running_var in place with momentum (PyTorch's
// definition: r = (1-m) r + m batch; the running variance takes the unbiased variance). running_* may be null.
template <class T>
void batchnorm_train_fwd(int N, int C, int HW, const T* x, const T* gamma, const T* beta, T* y, T* save_mean,
                         T* save_invstd, T* running_mean, T* running_var, double momentum, double eps);
// The training-mode output again from the statistics a training forward saved: y = gamma (x - mean) invstd +
// beta, bit-identical to what batchnorm_train_fwd wrote (so backward can recompute it instead of keeping it).
template <class T>
void batchnorm_apply(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* save_mean,
                     const T* save_invstd, T* y);
// Evaluation mode: running statistics.
template <class T>
void batchnorm_eval_fwd(int N, int C, int HW, const T* x, const T* gamma, const T* beta, const T* running_mean,
                        const T* running_var, double eps, T* y);
// Backward of the training-mode forward: dx, dgamma [C], dbeta [C] (any may be null). dx may alias dy.
template <class T>
void batchnorm_bwd(int N, int C, int HW, const T* x, const T* dy, const T* gamma, const T* save_mean,
                   const T* save_invstd, T* dx, T* dgamma, T* dbeta);

template <class T>
void relu_fwd(int64_t n, const T* x, T* y);  // y may alias x
// dx = dy where y > 0 else 0 (y is the ReLU's output); dx may alias dy.
template <class T>
void relu_bwd(int64_t n, const T* y, const T* dy, T* dx);
template <class T>
void add(int64_t n, const T* a, const T* b, T* y);  // y may alias a or b

// Max pool k x k, stride s, padding p (padding never wins). Ties: the first maximum in scan order, as PyTorch.
template <class T>
void maxpool_fwd(int N, int C, int H, int W, int k, int s, int p, const T* x, T* y);
// dx from x, dy: the gradient goes to the (first) maximum of each window; overlapping windows sum.
template <class T>
void maxpool_bwd(int N, int C, int H, int W, int k, int s, int p, const T* x, const T* dy, T* dx);

// Adaptive average pool to 1x1: y [N,C] = mean over HW.
template <class T>
void avgpool_fwd(int N, int C, int HW, const T* x, T* y);
template <class T>
void avgpool_bwd(int N, int C, int HW, const T* dy, T* dx);

// y [N,OUT] = x [N,IN] w^T + b.
template <class T>
void linear_fwd(int N, int IN, int OUT, const T* x, const T* w, const T* b, T* y);
// dx [N,IN], dw [OUT,IN], db [OUT] from dy [N,OUT].
template <class T>
void linear_bwd(int N, int IN, int OUT, const T* x, const T* w, const T* dy, T* dx, T* dw, T* db);

// Softmax over C per row: probs [N,C].
template <class T>
void softmax(int N, int C, const T* logits, T* probs);
// Weighted cross-entropy exactly as torch.nn.CrossEntropyLoss(weight=w, reduction='mean'):
// loss = sum_i w[y_i] * (-log softmax(x_i)[y_i]) / sum_i w[y_i]. Writes dlogits (of that mean loss; may be
// null) and probs (may be null); returns the loss. When sum_i w[y_i] == 0 the loss is NaN, as in PyTorch.
// Also as PyTorch: a label of -100 (its default ignore_index) adds to neither sum and gets a zero gradient row;
// any other label outside [0, C) throws. class_weights may be null (every weight 1).
template <class T>
T softmax_wce(int N, int C, const T* logits, const int64_t* labels, const T* class_weights, T* probs, T* dlogits);

// The notebook's class weights: weight_c = n / count_c, 0 for a class that never appears.
void class_weights_from_labels(int64_t n, const int64_t* labels, int num_classes, float* weights);

// One AdamW step, torch.optim.AdamW semantics (decoupled weight decay, bias correction); `step` is the
// 1-based step count after this update. Updates p, m, v in place.
template <class T>
void adamw_step(int64_t n, T* p, const T* g, T* m, T* v, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step);

}  // namespace vb::cpu
