// Helpers shared by the flash-attention kernels (practical and demo).
//
// Helpers that read an input are templated on its pointer type: MLX gives an
// input the `constant` address space when it has fewer than 8 elements and
// `device` otherwise, so a helper written for one of them would not compile
// for the other. The rest take and return plain values.
//
// The kernel contract (mlx_flash/fused.py builds the inputs):
//
//   * Inputs, in this order: q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
//     v (B, Hkv, Lk, Dv), mask_array (rank 4, broadcastable to
//     (B, Hq, Lq, Lk), read through its shape and strides), q_segments
//     (B, Lq) and k_segments (B, Lk) int32 ids, q_ranges and k_ranges
//     (B, T, 2) int32 per-tile (min, max) of the non-negative ids, sinks
//     (Hq,) float32, params, fparams; the backward adds dout (B, Hq, Lq, Dv),
//     lse and delta (B, Hq, Lq) float32. Any input may be a strided view
//     (kernels are built with ensure_row_contiguous=False). Absent parts are
//     small placeholders that params says not to read.
//   * params (int32): [q_len, k_len, n_q_heads, n_kv_heads, array_kind,
//     causal, window, has_segments, has_sinks] (flash_read_mask);
//     fparams (float32): [scale].
//   * The keep rule: score (i, j) is kept iff j < k_len, and
//     causal: j <= i + offset (offset = k_len - q_len, bottom-right; the
//     dispatcher only sends offset >= 0), window (> 0, with causal):
//     j > i + offset - window, segments: q_id(i) >= 0 && q_id(i) == k_id(j),
//     a boolean array: True. A dropped score weighs exactly 0 and gets no
//     gradient (-inf, never the dtype's lowest). An additive array is added
//     as it is: a row whose kept scores are all -inf is NaN, as in MLX.
//   * A row that keeps no key: output 0, lse +inf, no gradient.
//   * Sinks: the forward's online softmax starts from m = sink, l = 1 (one
//     extra key of logit sink and value 0); lse includes it. The backward
//     kernels never read sinks (lse carries them).
//   * lse is the natural log-sum-exp of the kept, scaled scores. A kernel
//     that works in log2 units converts when it writes and when it reads.
//   * Tiles: a (query tile, key tile) pair outside the causal / window band
//     (flash_key_begin/end, flash_row_begin/end) or whose segment ranges do
//     not meet (flash_ranges_meet) holds no kept score and is skipped,
//     uniformly across the threadgroup, before anything is staged.
//   * The mask input is called `mask_array`, not `mask`: MLX gives an input
//     a shape buffer whenever `<name>_shape` occurs anywhere in the kernel
//     body, and `mask_shape` contains `k_shape`, so `k` would get an unused
//     one.
//
// MLX puts its own preamble (metal_stdlib, `using namespace metal`, bfloat16)
// in front of the header, so none is included here.

// What params[4] says about mask_array (fused.ARRAY_*).
enum FlashArrayKind : int {
  FLASH_ARRAY_NONE = 0, // a placeholder, never read
  FLASH_ARRAY_BOOL = 1, // True keeps the score
  FLASH_ARRAY_ADD = 2, // added to the score as it is
};

// The structure of one attention call, from params.
struct FlashMask {
  int q_len;
  int k_len;
  int n_q_heads;
  int n_kv_heads;
  int array_kind; // FlashArrayKind
  bool causal;
  int window; // 0: no window
  bool segments;
  bool sinks;
  int offset; // k_len - q_len: query i's causal diagonal is key i + offset
};

template <typename Ptr>
inline FlashMask flash_read_mask(Ptr params) {
  FlashMask m;
  m.q_len = params[0];
  m.k_len = params[1];
  m.n_q_heads = params[2];
  m.n_kv_heads = params[3];
  m.array_kind = params[4];
  m.causal = params[5] != 0;
  m.window = params[6];
  m.segments = params[7] != 0;
  m.sinks = params[8] != 0;
  m.offset = m.k_len - m.q_len;
  return m;
}

// Whether the length, causal and window rules keep (row, key).
inline bool flash_position_keeps(FlashMask m, int row, int key) {
  if (key >= m.k_len) {
    return false;
  }
  if (m.causal && key > row + m.offset) {
    return false;
  }
  return m.window == 0 || key > row + m.offset - m.window;
}

// Keys [flash_key_begin(rows begin), flash_key_end(rows end)) hold every
// key that query rows [row_begin, row_end) can keep by the causal and window
// rules; a key loop over those rows visits no other.
inline int flash_key_begin(FlashMask m, int row_begin) {
  return m.window > 0 ? max(0, row_begin + m.offset - m.window + 1) : 0;
}

inline int flash_key_end(FlashMask m, int row_end) {
  return m.causal ? clamp(min(row_end, m.q_len) + m.offset, 0, m.k_len) : m.k_len;
}

// Query rows [flash_row_begin(keys begin), flash_row_end(keys end)) hold
// every row that can keep some key of [key_begin, key_end).
inline int flash_row_begin(FlashMask m, int key_begin) {
  return m.causal ? clamp(key_begin - m.offset, 0, m.q_len) : 0;
}

inline int flash_row_end(FlashMask m, int key_end) {
  return m.window > 0 ? clamp(min(key_end, m.k_len) - 1 - m.offset + m.window, 0, m.q_len)
                      : m.q_len;
}

// Whether two tiles' segment ranges (min, max of their non-negative ids;
// an empty tile has min > max) can hold an equal id.
inline bool flash_ranges_meet(int2 a, int2 b) {
  return a.x <= b.y && b.x <= a.y;
}

// Whether segment ids keep a (query, key) pair: same document, not padding.
inline bool flash_segments_keep(int q_id, int k_id) {
  return q_id >= 0 && q_id == k_id;
}

// Helpers of the previous interface (a mask kind in params[4], dropped
// scores at `lowest`), kept for kernels that still use it.
//
//   * `params` (int32):   [q_len, k_len, n_q_heads, n_kv_heads, mask_kind]
//   * `fparams` (float32): [scale, lowest], `lowest` being the most negative
//     finite value of the input dtype (what a dropped score becomes).

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
