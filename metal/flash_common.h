// Helpers shared by the flash-attention kernels (practical and demo).
//
// Everything here takes and returns plain values, never pointers: MLX gives an
// input the `device` or the `constant` address space depending on its size,
// so a helper that took a pointer would only compile for one of the two.
//
// Conventions the kernels share:
//   * `params` (int32):   [q_len, k_len, n_q_heads, n_kv_heads, mask_kind]
//   * `fparams` (float32): [scale, lowest], `lowest` being the most negative
//     finite value of the input dtype (what a dropped score becomes).
//   * Causal masks are aligned bottom-right: query i sees key j iff
//     j <= i + (k_len - q_len).
//   * The mask input is called `mask_array`, not `mask`: MLX gives an input
//     a shape buffer whenever `<name>_shape` occurs anywhere in the kernel
//     body, and `mask_shape` contains `k_shape`, so `k` would get an unused
//     one.
//
// MLX puts its own preamble (metal_stdlib, `using namespace metal`, bfloat16)
// in front of the header, so none is included here.

// What the `mask` input of a kernel means; the value is params[4].
enum FlashMaskKind : int {
  FLASH_MASK_NONE = 0, // `mask` is a placeholder, never read
  FLASH_MASK_CAUSAL = 1, // `mask` is a placeholder, never read
  FLASH_MASK_BOOL = 2, // True keeps the score, False replaces it by `lowest`
  FLASH_MASK_ADD = 3, // added to the score as it is
};

// Stride of a broadcast axis: a size-1 axis is read at index 0 whatever the
// stride of the underlying array says.
inline int64_t flash_axis_stride(int size, int64_t stride) {
  return size == 1 ? 0 : stride;
}

// exp(x) as one exp2, cheaper than a precise exp. The factor is applied to
// the difference of two scores rather than folded into the scale, so masks
// stay in natural units: scaling an additive mask of the dtype's lowest value
// by log2(e) would overflow to -inf and turn a fully masked row's uniform
// weights into NaN. exp2(-inf) is 0 and exp2(0) is 1 exactly, as for exp.
constant constexpr float FLASH_LOG2E = 1.44269504088896340736f;

inline float flash_exp(float x) {
  return exp2(x * FLASH_LOG2E);
}

// The maximum to subtract before exponentiating. A running maximum of -inf
// means every score seen so far is -inf (or nothing was seen yet); using 0
// then keeps exp(-inf - max) at 0 instead of exp(-inf + inf) = NaN, so a tile
// whose scores are all -inf cannot poison the rest of its row.
inline float flash_exp_base(float running_max) {
  return running_max == -INFINITY ? 0.0f : running_max;
}

// Whether causal attention lets query `row` see key `key`.
inline bool flash_causal_keeps(int row, int key, int q_len, int k_len) {
  return key <= row + (k_len - q_len);
}

// One past the last key that any of the query rows [row_begin, row_end) can
// see under a causal mask: the key loop of a query tile stops here.
inline int flash_causal_key_end(int row_end, int q_len, int k_len) {
  return min(k_len, row_end + (k_len - q_len));
}

// The first query row that can see key `key` under a causal mask: the query
// loop of a key tile starts at or before this row.
inline int flash_causal_row_begin(int key, int q_len, int k_len) {
  return max(0, key - (k_len - q_len));
}

// Softmax weight of a dropped (boolean-masked or causal-masked) score, given
// the row's log-sum-exp. A row that keeps nothing has every score equal to
// `lowest`, so its weights are uniform, 1 / k_len. Its log-sum-exp,
// lowest + log(k_len), is not representable next to `lowest` in float32,
// which is why such a row is recognised by its log-sum-exp lying within
// log(k_len) + 1 of `lowest`: a row with any kept (finite) score has a
// log-sum-exp at least that score, far above `lowest`.
inline float flash_dropped_weight(float lse, float lowest, int k_len) {
  float uniform_lse_gap = log(float(k_len)) + 1.0f;
  return (lse - lowest <= uniform_lse_gap) ? 1.0f / float(k_len)
                                           : flash_exp(lowest - lse);
}
