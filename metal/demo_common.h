// Helpers shared by the demo kernels (demo_forward.metal, demo_backward_*.metal).
// The kernels' header is flash_common.h followed by this file, so the mask
// helpers of both are in scope.
//
// The demo kernels do every product on 8x8 simdgroup_matrix tiles: half or
// bfloat operands, float accumulators. Softmax and masking work on the
// accumulator elements each lane holds (thread_elements()), so they need the
// element-to-lane layout of an 8x8 simdgroup_matrix, written down once here.
//
// Scores stay in natural units (scale * q.k + additive mask), as the lse
// is; an exponential is exp2 of a difference times log2(e). Folding log2(e)
// into the scores instead would overflow an additive mask near the dtype's
// lowest value to -inf (see flash_common.h, FLASH_LOG2E).

// Extra elements per threadgroup-memory row. At D = 64 and 128 an unpadded
// row of D halves is 128 or 256 bytes, so the eight rows an 8x8
// simdgroup_load reads would start a multiple of 128 bytes apart, a likely
// bank conflict; at D = 80 and 96 (160 and 192 bytes) fewer of them line up.
// 8 more elements (16 bytes) per row stagger them at every D, for 8 / D more
// memory. Apple does not document its bank layout, and the pad has not been
// measured against none. Rows stay a multiple of 4 elements (8 bytes), which
// demo_stage's vector stores need.
#define DEMO_PAD 8

// Loops over the fragments of a tile are unrolled so that arrays of
// simdgroup_matrix are indexed with constants and live in registers.
#define DEMO_UNROLL _Pragma("clang loop unroll(full)")

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

// Max, sum and "any" over the four lanes holding one row (see
// demo_frag_coord).
inline float demo_row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  return max(x, simd_shuffle_xor(x, ushort(8)));
}

inline float demo_row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

inline bool demo_row_any(bool x) {
  return demo_row_max(x ? 1.0f : 0.0f) > 0.0f;
}

// exp2 that is exact where the kernels rely on it: exp2(-inf) == 0 (dropped
// scores, rows that keep nothing, whose lse is +inf) and NaN stays NaN (rows
// whose kept scores are all -inf, whose lse is -inf). Finite arguments take
// the fast approximation, which the tests' tolerances allow for.
inline float demo_exp2(float x) {
  return isfinite(x) ? fast::exp2(x) : precise::exp2(x);
}

// Tile storage: threadgroup arrays are declared as vec<T, 4> so that every
// tile starts 8-byte aligned, and used through a T pointer.
template <typename T>
inline threadgroup T* demo_elements(threadgroup vec<T, 4>* storage) {
  return reinterpret_cast<threadgroup T*>(storage);
}

// Copy ROWS rows of a (rows, D) matrix with the given strides, starting at
// row `first`, into a tile in threadgroup memory (row stride LD); rows at or
// past `limit` are zero so tails add nothing to the products. The n_threads
// threads of the group share the copy. `Ptr` is a device or constant
// pointer: MLX picks the address space of an input by its size.
//
// Each step moves 4 adjacent elements of one row (D is a multiple of 8, so
// a step never crosses a row) and writes them with one 8-byte vector store:
// the tile's rows are a multiple of 4 elements and start 8-byte aligned. The
// device loads stay scalar: an MLX view may start at any element of its
// buffer (x[..., 1:] starts 2 bytes in), an offset the kernel cannot see, so
// a vector load is not guaranteed the alignment Metal requires. Rows with
// unit column stride (the usual layout, transposed or not) read from a row
// pointer with constant offsets.
template <typename T, int ROWS, int D, int LD, typename Ptr>
inline void demo_stage(
    threadgroup T* dst,
    Ptr src,
    int64_t row_stride,
    int64_t col_stride,
    int first,
    int limit,
    uint tid,
    uint n_threads) {
  constexpr int D4 = D / 4;
  for (uint i = tid; i < uint(ROWS * D4); i += n_threads) {
    const int r = int(i) / D4;
    const int c = (int(i) - r * D4) * 4;
    threadgroup vec<T, 4>* out = reinterpret_cast<threadgroup vec<T, 4>*>(dst + r * LD + c);
    if (first + r >= limit) {
      *out = vec<T, 4>(T(0.0f));
    } else if (col_stride == 1) {
      const auto in = src + (first + r) * row_stride + c;
      *out = vec<T, 4>(T(in[0]), T(in[1]), T(in[2]), T(in[3]));
    } else {
      const auto in = src + (first + r) * row_stride + c * col_stride;
      *out = vec<T, 4>(
          T(in[0]), T(in[col_stride]), T(in[2 * col_stride]), T(in[3 * col_stride]));
    }
  }
}

// The segment id at `pos` of row `batch` of a (B, L) ids input.
template <typename Ptr, typename StridePtr>
inline int demo_segment_id(Ptr ids, StridePtr strides, int batch, int pos) {
  return ids[batch * strides[0] + pos * strides[1]];
}

// The segment id of this lane's fragment row, position `first + row` of a
// SIMD group's 8 (clamped to `length - 1`): lane r < 8 loads position
// first + r and a shuffle hands it to the four lanes that hold the row, so
// a SIMD group makes 8 loads instead of 32. Every lane calls it (a shuffle).
template <typename Ptr, typename StridePtr>
inline int demo_row_segment_id(
    Ptr ids, StridePtr strides, int batch, int first, int length, ushort lane, short row) {
  const int own = lane < 8 ? demo_segment_id(ids, strides, batch, min(first + int(lane), length - 1)) : 0;
  return simd_shuffle(own, ushort(row));
}

// Stage the BK keys from k_start: their K and V rows (zero past
// k_len) and, with segment ids, their ids (the last key's past k_len; such
// keys are dropped by position anyway). `k` and `v` point at this batch and
// KV head; k_strides / v_strides are the inputs' (rows at [2], columns at
// [3]).
template <
    typename T,
    int BK,
    int D,
    int LD,
    typename KPtr,
    typename VPtr,
    typename IdPtr,
    typename StridePtr,
    typename IdStridePtr>
inline void demo_stage_keys(
    threadgroup T* k_tile,
    threadgroup T* v_tile,
    threadgroup int* k_ids,
    KPtr k,
    StridePtr k_strides,
    VPtr v,
    StridePtr v_strides,
    IdPtr k_segments,
    IdStridePtr k_segments_strides,
    FlashMask m,
    int batch,
    int k_start,
    uint tid,
    uint n_threads) {
  demo_stage<T, BK, D, LD>(k_tile, k, k_strides[2], k_strides[3], k_start, m.k_len, tid, n_threads);
  demo_stage<T, BK, D, LD>(v_tile, v, v_strides[2], v_strides[3], k_start, m.k_len, tid, n_threads);
  if (m.segments) {
    for (uint j = tid; j < uint(BK); j += n_threads) {
      const int key = min(k_start + int(j), m.k_len - 1);
      k_ids[j] = demo_segment_id(k_segments, k_segments_strides, batch, key);
    }
  }
}

// Offset of (batch, head, row) in the array mask, whose broadcast (size-1)
// axes are read at index 0.
template <typename ShapePtr, typename StridePtr>
inline int64_t demo_mask_row(ShapePtr shape, StridePtr strides, int batch, int head, int row) {
  return batch * flash_axis_stride(shape[0], strides[0]) + head * flash_axis_stride(shape[1], strides[1]) +
      row * flash_axis_stride(shape[2], strides[2]);
}

// Whether the causal, window and length rules keep every pair of the tile
// rows [row_begin, row_end) x keys [key_begin, key_end), with no segments
// and no boolean array to test: the kernels then skip the per-score tests.
// Rows past q_len count as kept; the kernels never store them.
inline bool demo_tile_full(FlashMask m, int row_begin, int row_end, int key_begin, int key_end) {
  if (m.segments || m.array_kind == FLASH_ARRAY_BOOL || key_end > m.k_len) {
    return false;
  }
  if (m.causal && key_end - 1 > row_begin + m.offset) {
    return false;
  }
  return m.window == 0 || key_begin > row_end - 1 + m.offset - m.window;
}

// The score s = scale * q.k of (row, key) with the mask applied: the
// additive array added, -inf where any rule drops it (full: the tile keeps
// every pair, see demo_tile_full). `kept` becomes true when the pair is
// kept, additive -inf included. q_id and k_id are the pair's segment ids
// (read only with segments); `mrow` is the array mask's offset of the row,
// `msj` its key stride. Keys past k_len are never read.
template <typename MaskPtr>
inline float demo_masked_score(
    float s,
    FlashMask m,
    bool full,
    int row,
    int key,
    int q_id,
    int k_id,
    MaskPtr mask,
    int64_t mrow,
    int64_t msj,
    thread bool& kept) {
  bool keep = full;
  if (!full) {
    keep = flash_position_keeps(m, row, key) && (!m.segments || flash_segments_keep(q_id, k_id));
    if (keep && m.array_kind == FLASH_ARRAY_BOOL) {
      keep = bool(mask[mrow + key * msj]);
    }
  }
  if (keep && m.array_kind == FLASH_ARRAY_ADD) {
    s += float(mask[mrow + key * msj]);
  }
  kept = kept || keep;
  return keep ? s : -INFINITY;
}
