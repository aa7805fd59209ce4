// Bindings of the GEMM-based entry points: gemm (matmul), linear and sum_rows (a bias gradient).
#include "cpu/gemm.h"

#include <vector>

#include "bindings/binding.h"
#include "cpu/reduce.h"
#include "cuda/cuda_api.h"

namespace nnk {
namespace {

template <class T>
Gemm<T> gemm_of(const TensorView& a, const TensorView& b, const TensorView& out, int64_t M,
                int64_t N, int64_t K, double alpha, double beta, const TensorView& bias) {
  Gemm<T> g;
  g.M = M, g.N = N, g.K = K;
  g.A = a.ptr<const T>(), g.rsa = a.stride(-2), g.csa = a.stride(-1);
  g.B = b.ptr<const T>(), g.rsb = b.stride(-2), g.csb = b.stride(-1);
  g.C = out.ptr<T>(), g.rsc = out.stride(-2), g.csc = out.stride(-1);
  g.alpha = T(alpha), g.beta = T(beta);
  g.bias_n = bias.ptr<const T>();
  return g;
}

// The bfloat16 products (CPU only: the gemm dtype table): a bfloat16 bias is widened to float32
// once, the products run one after another, each on all threads.
void run_gemm_bf16(const TensorView& a, const TensorView& b, const TensorView& out, int64_t M,
                   int64_t N, int64_t K, double alpha, double beta, const TensorView& bias,
                   int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
  std::vector<float> bias_f32;
  if (bias.data) {
    bias_f32.resize(size_t(N));
    cpu::bf16_to_f32_n(bias.ptr<const uint16_t>(), bias_f32.data(), N, bias.stride(-1));
  }
  cpu::GemmBf16 g;
  g.M = M, g.N = N, g.K = K;
  g.rsa = a.stride(-2), g.csa = a.stride(-1);
  g.rsb = b.stride(-2), g.csb = b.stride(-1);
  g.rsc = out.stride(-2), g.csc = out.stride(-1);
  g.c_bf16 = true;
  g.alpha = float(alpha), g.beta = float(beta);
  g.bias_n = bias.data ? bias_f32.data() : nullptr;
  run_cpu(double(batch) * double(M) * double(N) * double(K), [&] {
    for (int64_t i = 0; i < batch; ++i) {
      g.A = a.ptr<const uint16_t>() + i * sa;
      g.B = b.ptr<const uint16_t>() + i * sb;
      g.C = out.ptr<uint16_t>() + i * sc;
      cpu::gemm_bf16(g);
    }
  });
}

// `batch` products: item i at a + i*sa, b + i*sb, out + i*sc (sa or sb 0: shared operand).
void run_gemm(const TensorView& a, const TensorView& b, const TensorView& out, int64_t M, int64_t N,
              int64_t K, double alpha, double beta, const TensorView& bias, int64_t batch,
              int64_t sa, int64_t sb, int64_t sc) {
  if (a.dtype == DType::bf16)
    return run_gemm_bf16(a, b, out, M, N, K, alpha, beta, bias, batch, sa, sb, sc);
  run(
      a, double(batch) * double(M) * double(N) * double(K),
      [&](auto t) {
        using T = decltype(t);
        cpu::gemm_batched(gemm_of<T>(a, b, out, M, N, K, alpha, beta, bias), batch, sa, sb, sc);
      },
      [&](auto s) {
        cuda::sgemm(gemm_of<float>(a, b, out, M, N, K, alpha, beta, bias), batch, sa, sb, sc,
                    s.device, s.stream);
      });
}

// out = alpha * op(a) @ op(b) + beta * out (+ bias broadcast over rows).
// a (M, K) or (B, M, K); b (K, N) or (B, K, N); out (M, N) or (B, M, N); bias (N,) or None.
// A 2-D a or b next to a 3-D out is shared by every batch item. op(x) swaps x's last two dims when
// trans_x (a strided view, no copy).
py::object gemm(Call& c) {
  TensorView a = c.tensor(0), b = c.tensor(1);
  const TensorView out = c.output(2);
  const double alpha = c.f64(3, 1.0), beta = c.f64(4, 0.0);
  const TensorView bias = c.tensor_or_none(5);
  if (c.flag(6, false)) a = transposed(a);
  if (c.flag(7, false)) b = transposed(b);
  check_float(a, "a", Dtypes::gemm);
  check_like(b, "b", a, "a");
  check_like(out, "out", a, "a");
  check_ndim(a, "a", {2, 3});
  check_ndim(b, "b", {2, 3});
  check_ndim(out, "out", {2, 3});
  NNK_CHECK_VALUE(out.ndim == 3 || (a.ndim == 2 && b.ndim == 2),
                  "out must be 3-D (batched) when a or b is 3-D, got out of shape ",
                  shape_str(out));
  const int64_t batch = out.ndim == 3 ? out.shape[0] : 1;
  NNK_CHECK_VALUE(a.ndim == 2 || a.shape[0] == batch, "a has batch size ", a.shape[0],
                  " but out has ", batch);
  NNK_CHECK_VALUE(b.ndim == 2 || b.shape[0] == batch, "b has batch size ", b.shape[0],
                  " but out has ", batch);
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  NNK_CHECK_VALUE(b.size(-2) == K, "a and b cannot be multiplied: a is ", shape_str(a),
                  " and b is ", shape_str(b), " (inner dimensions ", K, " and ", b.size(-2),
                  " differ)");
  if (out.ndim == 3)
    check_shape(out, "out", {batch, M, N});
  else
    check_shape(out, "out", {M, N});
  check_output(out, "out");
  check_no_overlap(out, "out", a, "a");
  check_no_overlap(out, "out", b, "b");
  if (bias.data) {
    check_vector(bias, "bias", N, a, "a");
    check_no_overlap(out, "out", bias, "bias");
  }
  run_gemm(a, b, out, M, N, K, alpha, beta, bias, batch, a.ndim == 3 ? a.strides[0] : 0,
           b.ndim == 3 ? b.strides[0] : 0, out.ndim == 3 ? out.strides[0] : 0);
  return py::none();
}
NNK_BINDING(gemm, "a, b, out, alpha=1.0, beta=0.0, bias=None, trans_a=False, trans_b=False",
            "out = alpha * op(a) @ op(b) + beta * out (+ bias), 2-D or batched 3-D, any strides; "
            "op(x) swaps x's last two dims when trans_x.");

// The (rows, last dim) matrix of a (*, n) view: true when its leading dims fold into one index
// (consecutive dims larger than 1 nest exactly), with their product in *rows and the row stride
// in *ld. A 1-D view is one row.
bool fold_rows(const TensorView& v, int64_t* rows, int64_t* ld) {
  *rows = 1;
  *ld = v.shape[v.ndim - 1] * v.strides[v.ndim - 1];  // any value serves a single row
  int inner = -1;  // the innermost leading dim larger than 1 seen so far
  for (int d = v.ndim - 2; d >= 0; --d) {
    *rows *= v.shape[d];
    if (v.shape[d] <= 1) continue;
    if (inner < 0)
      *ld = v.strides[d];
    else if (v.strides[d] != v.shape[inner] * v.strides[inner])
      return false;
    inner = d;
  }
  return true;
}

// The (rows, n) matrix of a (*, n) view whose leading dims fold (see fold_rows), named for
// messages.
TensorView rows_of(const TensorView& v, const char* name) {
  int64_t rows, ld;
  NNK_CHECK_VALUE(v.ndim >= 1 && fold_rows(v, &rows, &ld), name,
                  " must be at least 1-D with leading dims that fold into one, got shape ",
                  shape_str(v));
  TensorView m = v;
  m.ndim = 2;
  m.shape[0] = rows, m.shape[1] = v.shape[v.ndim - 1];
  m.strides[0] = ld, m.strides[1] = v.strides[v.ndim - 1];
  return m;
}

// out = input @ weight^T + bias, as torch.nn.functional.linear: input (*, in), weight (out, in),
// bias (out,) or None, out (*, out). The leading dims of input and out fold into the GEMM's rows.
py::object linear(Call& c) {
  const TensorView x = c.tensor(0), w = c.tensor(1);
  const TensorView bias = c.tensor_or_none(2), out = c.output(3);
  check_float(x, "input", Dtypes::gemm);
  check_like(w, "weight", x, "input");
  NNK_CHECK_VALUE(x.ndim >= 1,
                  "linear: input must be at least 1-D (*, in_features), got a 0-D "
                  "tensor");
  NNK_CHECK_IMPLEMENTED(w.ndim != 1,
                        "linear: a 1-D weight (torch's vector form) is not "
                        "supported; pass it as (1, in_features)");
  NNK_CHECK_VALUE(w.ndim == 2, "linear: weight must be 2-D (out_features, in_features), got shape ",
                  shape_str(w));
  const int64_t N = w.shape[0], K = w.shape[1];
  NNK_CHECK_VALUE(x.shape[x.ndim - 1] == K, "linear: input has ", x.shape[x.ndim - 1],
                  " features in its last dimension (shape ", shape_str(x), ") but weight ",
                  shape_str(w), " expects ", K);
  if (c.given(2)) {
    check_like(bias, "bias", x, "input");
    NNK_CHECK_VALUE(bias.ndim == 1 && bias.shape[0] == N, "linear: bias must have shape (", N,
                    ",) to match weight ", shape_str(w), ", got ", shape_str(bias));
    NNK_CHECK_VALUE(N <= 1 || bias.strides[0] == 1, "bias must be contiguous");
  }
  check_like(out, "out", x, "input");
  NNK_CHECK_VALUE(out.ndim == x.ndim, "out must have shape (*input.shape[:-1], ", N, "), got ",
                  shape_str(out));
  for (int d = 0; d + 1 < x.ndim; ++d)
    NNK_CHECK_VALUE(out.shape[d] == x.shape[d], "out must have shape (*input.shape[:-1], ", N,
                    "), got ", shape_str(out));
  NNK_CHECK_VALUE(out.shape[out.ndim - 1] == N, "out must have shape (*input.shape[:-1], ", N,
                  "), got ", shape_str(out));
  check_output(out, "out");
  check_no_overlap(out, "out", x, "input");
  check_no_overlap(out, "out", w, "weight");
  if (bias.data) check_no_overlap(out, "out", bias, "bias");
  // The (M, K) and (M, N) matrices of input and out; weight read transposed.
  const TensorView a = rows_of(x, "input"), o = rows_of(out, "out");
  run_gemm(a, transposed(w), o, a.shape[0], N, K, 1.0, 0.0, bias, 1, 0, 0, 0);
  return py::none();
}
NNK_BINDING(linear, "input, weight, bias, out",
            "out = input @ weight^T + bias for input (*, in) and out (*, out); the bias (or None) "
            "is added in the GEMM's store.");

// out[j] = sum_i x[i, j] for a checked (R, N) view x and (N,) out.
void run_sum_rows(const TensorView& x, const TensorView& out) {
  const int64_t R = x.shape[0], N = x.shape[1];
  if (x.dtype == DType::bf16)
    return run_cpu(double(R) * double(N), [&] {
      cpu::sum_rows_bf16(R, N, x.ptr<const uint16_t>(), x.strides[0], x.strides[1],
                         out.ptr<uint16_t>(), out.strides[0]);
    });
  run(
      x, double(R) * double(N),
      [&](auto t) {
        using T = decltype(t);
        cpu::sum_rows(R, N, x.ptr<const T>(), x.strides[0], x.strides[1], out.ptr<T>(),
                      out.strides[0]);
      },
      [&](auto s) {
        cuda::sum_rows(R, N, x.ptr<const float>(), x.strides[0], x.strides[1], out.ptr<float>(),
                       out.strides[0], s.device, s.stream);
      });
}

// The gradients of linear for grad_output dy (*, out): grad_input = dy @ weight (*, in) (needs
// weight), grad_weight = dy^T @ input (out, in) (needs input), grad_bias = the column sums of dy
// (out,). Each output may be None, and so may an operand its output does not need. One call for
// the three: a tiny layer's backward is mostly the cost of each call.
py::object linear_backward(Call& c) {
  const TensorView dy = c.tensor(0);
  check_float(dy, "grad_output", Dtypes::gemm);
  const TensorView g = rows_of(dy, "grad_output");
  const int64_t M = g.shape[0], N = g.shape[1];
  const TensorView none;
  std::pair<const TensorView*, const char*> written[3];
  int nwritten = 0;
  auto output = [&](int i, const char* name) {
    const TensorView v = c.output(i);
    check_like(v, name, dy, "grad_output");
    check_output(v, name);
    check_no_overlap(v, name, dy, "grad_output");
    return v;
  };
  TensorView w, x, xa, dx, dw, db;  // xa: input as its (M, K) matrix
  if (c.given(3)) {                 // grad_input (*, K) = dy @ w
    w = c.tensor(2);
    check_like(w, "weight", dy, "grad_output");
    check_ndim(w, "weight", {2});
    NNK_CHECK_VALUE(w.shape[0] == N, "weight ", shape_str(w), " does not match grad_output ",
                    shape_str(dy));
    dx = output(3, "grad_input");
    NNK_CHECK_VALUE(dx.ndim == dy.ndim && dx.shape[dx.ndim - 1] == w.shape[1], "grad_input ",
                    shape_str(dx), " must be grad_output's leading dims x ", w.shape[1]);
    for (int d = 0; d + 1 < dx.ndim; ++d)
      NNK_CHECK_VALUE(dx.shape[d] == dy.shape[d], "grad_input ", shape_str(dx),
                      " must have grad_output's leading dims ", shape_str(dy));
    check_no_overlap(dx, "grad_input", w, "weight");
    written[nwritten++] = {&dx, "grad_input"};
  }
  if (c.given(4)) {  // grad_weight (N, K) = dy^T @ x
    x = c.tensor(1);
    check_like(x, "input", dy, "grad_output");
    xa = rows_of(x, "input");
    NNK_CHECK_VALUE(xa.shape[0] == M, "input ", shape_str(x), " and grad_output ", shape_str(dy),
                    " must have the same leading dims");
    dw = output(4, "grad_weight");
    check_shape(dw, "grad_weight", {N, xa.shape[1]});
    check_no_overlap(dw, "grad_weight", x, "input");
    written[nwritten++] = {&dw, "grad_weight"};
  }
  if (c.given(5)) {  // grad_bias (N,)
    db = output(5, "grad_bias");
    check_vector(db, "grad_bias", N, dy, "grad_output");
    written[nwritten++] = {&db, "grad_bias"};
  }
  for (int o = 0; o < nwritten; ++o)
    for (int p = 0; p < o; ++p)
      check_no_overlap(*written[o].first, written[o].second, *written[p].first, written[p].second);
  if (dx.ndim) {
    const TensorView gx = rows_of(dx, "grad_input");
    run_gemm(g, w, gx, M, gx.shape[1], N, 1.0, 0.0, none, 1, 0, 0, 0);
  }
  if (dw.ndim) run_gemm(transposed(g), xa, dw, N, xa.shape[1], M, 1.0, 0.0, none, 1, 0, 0, 0);
  if (db.ndim) run_sum_rows(g, db);
  return py::none();
}
NNK_BINDING(linear_backward, "grad_output, input, weight, grad_input, grad_weight, grad_bias",
            "grad_input = grad_output @ weight, grad_weight = grad_output^T @ input, grad_bias = "
            "the column sums of grad_output, for linear's (*, n) operands; each output None to "
            "skip (input and weight then None too where unused).");

// out[j] = sum_i x[i, j] for a 2-D x (R, N) and out (N,).
py::object sum_rows(Call& c) {
  const TensorView x = c.tensor(0), out = c.output(1);
  check_float(x, "x", Dtypes::gemm);
  check_like(out, "out", x, "x");
  check_ndim(x, "x", {2});
  check_shape(out, "out", {x.shape[1]});
  check_output(out, "out");
  check_no_overlap(out, "out", x, "x");
  run_sum_rows(x, out);
  return py::none();
}
NNK_BINDING(sum_rows, "x, out", "out[j] = sum_i x[i, j].");

}  // namespace
}  // namespace nnk
