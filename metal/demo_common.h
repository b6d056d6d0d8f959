// Helpers shared by the demo kernels (demo_forward.metal, demo_backward_*.metal).
// The kernels' header is flash_common.h followed by this file, so the helpers
// of both are in scope (flash_axis_stride reads the mask's broadcast axes).
//
// The demo kernels do every product on 8x8 simdgroup_matrix tiles: half or
// bfloat operands, float accumulators. Softmax and masking work on the
// accumulator elements each lane holds (thread_elements()), so they need the
// element-to-lane layout of an 8x8 simdgroup_matrix, written down once here.
//
// Scores live in log2 units: s2 = (scale * q.k + additive mask) * log2(e),
// so every exponential is one exp2.

// Mask kinds (the MASK template constant).
#define DEMO_MASK_NONE 0
#define DEMO_MASK_CAUSAL 1
#define DEMO_MASK_BOOL 2
#define DEMO_MASK_ADDITIVE 3

// Extra elements per threadgroup-memory row. At D = 64 and 128 an unpadded
// row of D halves is 128 or 256 bytes, so the eight rows an 8x8
// simdgroup_load reads would start a multiple of 128 bytes apart, a likely
// bank conflict; at D = 80 and 96 (160 and 192 bytes) fewer of them line up.
// 8 more elements (16 bytes) per row stagger them at every D, for 8 / D more
// memory. Apple does not document its bank layout, and the pad has not been
// measured against none.
#define DEMO_PAD 8

// Loops over the fragments of a tile are unrolled so that arrays of
// simdgroup_matrix are indexed with constants and live in registers.
#define DEMO_UNROLL _Pragma("clang loop unroll(full)")

// Score given to masked-out entries (boolean False, causal): the lowest
// finite float. A row whose mask keeps nothing then has all scores equal and
// gets uniform weights, as MLX gives it; anywhere else exp2 of it is 0.
constant constexpr float DEMO_FLOOR = -3.40282346638528859812e+38f;
constant constexpr float DEMO_LOG2E = 1.44269504088896340736f;

// Position of this lane's two elements in an 8x8 simdgroup_matrix: they sit
// in one row, in two adjacent columns. Returns (column of the first, row).
//
// Lane bits b4..b0 map to row 4*b4 + 2*b2 + b1 and column 4*b3 + 2*b0, so
// every lane holds elements of a single row in every fragment, and the four
// lanes that share a row differ only in bits 0 and 3.
inline short2 demo_frag_coord(ushort lane) {
  const short quad = lane / 4;
  const short row = (quad & 4) + (lane / 2) % 4;
  const short col = (quad & 2) * 2 + (lane % 2) * 2;
  return short2(col, row);
}

// Max and sum over the four lanes holding one row (see demo_frag_coord).
inline float demo_row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  return max(x, simd_shuffle_xor(x, ushort(8)));
}

inline float demo_row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// Copy ROWS rows of a (rows, D) matrix with the given strides, starting at
// row `first`, into a threadgroup tile with row stride LD; rows at or past
// `limit` are zero so tails add nothing to the products. NT threads share
// the copy. `Ptr` is a device or constant pointer: MLX picks the address
// space of an input by its size.
//
// Rows with unit column stride (the usual layout, transposed or not) take a
// fast path: each step copies 4 adjacent elements of one row (D is a
// multiple of 8, so a step never crosses a row) from a row pointer computed
// once per step, instead of a division and a strided offset per element.
// The loads stay scalar: an MLX view may start at any element of its buffer
// (x[..., 1:] starts 2 bytes in), an offset the kernel cannot see, so a
// 4-element vector load is not guaranteed the alignment Metal requires.
template <typename T, int ROWS, int D, int LD, int NT, typename Ptr>
inline void demo_stage(
    threadgroup T* dst,
    Ptr src,
    int64_t row_stride,
    int64_t col_stride,
    int first,
    int limit,
    uint tid) {
  if (col_stride == 1) {
    constexpr int D4 = D / 4;
    for (int i = tid; i < ROWS * D4; i += NT) {
      const int r = i / D4;
      const int c = (i - r * D4) * 4;
      threadgroup T* out = dst + r * LD + c;
      if (first + r < limit) {
        const auto in = src + (first + r) * row_stride + c;
        out[0] = T(in[0]);
        out[1] = T(in[1]);
        out[2] = T(in[2]);
        out[3] = T(in[3]);
      } else {
        out[0] = out[1] = out[2] = out[3] = T(0.0f);
      }
    }
    return;
  }
  for (int i = tid; i < ROWS * D; i += NT) {
    const int r = i / D;
    const int c = i - r * D;
    dst[r * LD + c] =
        (first + r < limit) ? T(src[(first + r) * row_stride + c * col_stride]) : T(0.0f);
  }
}

// Score s2 (already in log2 units) of query i and key j with the mask
// applied. `mrow` is the mask offset of row i, `msj` the key stride.
// Keys past the end get -inf: they take no weight even in a row whose mask
// keeps nothing.
template <int MASK, typename MaskPtr>
inline float demo_mask_score(
    float s2,
    int i,
    int j,
    int k_len,
    int causal_offset,
    MaskPtr mask,
    int64_t mrow,
    int64_t msj) {
  if (j >= k_len) {
    return -INFINITY;
  }
  if (MASK == DEMO_MASK_CAUSAL) {
    return (j > i + causal_offset) ? DEMO_FLOOR : s2;
  }
  if (MASK == DEMO_MASK_BOOL) {
    return bool(mask[mrow + j * msj]) ? s2 : DEMO_FLOOR;
  }
  if (MASK == DEMO_MASK_ADDITIVE) {
    // An additive -inf stays -inf (a row of them is NaN, as in MLX); huge
    // finite values (a bfloat16 lowest times log2(e) overflows) stop at the
    // floor so they act like a boolean False.
    const float a = float(mask[mrow + j * msj]);
    if (isinf(a)) {
      return s2 + a;
    }
    return max(s2 + max(a * DEMO_LOG2E, DEMO_FLOOR), DEMO_FLOOR);
  }
  return s2;
}

// True where the boolean or causal mask drops (i, j): such entries get no
// gradient, even in a row whose mask keeps nothing.
template <int MASK, typename MaskPtr>
inline bool demo_mask_drops(
    int i,
    int j,
    int causal_offset,
    MaskPtr mask,
    int64_t mrow,
    int64_t msj) {
  if (MASK == DEMO_MASK_CAUSAL) {
    return j > i + causal_offset;
  }
  if (MASK == DEMO_MASK_BOOL) {
    return !bool(mask[mrow + j * msj]);
  }
  return false;
}

// Softmax weight of an entry with score s2 in a row whose log-sum-exp
// (log2 units) is lse2. A row whose scores all sit at the floor stores
// lse2 == DEMO_FLOOR (its count is lost to rounding): its weights are
// uniform over the k_len keys, 1 / k_len.
inline float demo_weight(float s2, float lse2, float inv_k_len) {
  if (lse2 == DEMO_FLOOR) {
    return s2 == DEMO_FLOOR ? inv_k_len : 0.0f;
  }
  return fast::exp2(s2 - lse2);
}
