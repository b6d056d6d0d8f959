// Helpers shared by the flash-attention kernels (practical and demo), and the
// contract of their inputs.
//
// Inputs, in the order of mlx_flash.fused.KERNEL_INPUTS:
//   q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): any strides.
//   mask_array: rank 4, broadcastable to (B, Hq, Lq, Lk), bool or q's dtype,
//     any strides (a size-1 axis is read at index 0: flash_axis_stride); a
//     placeholder, never read, unless params[4] says otherwise. It is called
//     `mask_array`, not `mask`: MLX gives an input a shape buffer whenever
//     `<name>_shape` occurs in the body, and `mask_shape` contains `k_shape`.
//   q_segments (B, Lq), k_segments (B, Lk): int32 document ids, any strides
//     (views are not copied); placeholders unless params[7].
//   q_ranges (B, ceil(Lq / q_tile), 4), k_ranges (B, ceil(Lk / k_tile), 4):
//     int32 (min, max) of the non-negative ids of each tile of q_tile query
//     (k_tile key) positions, the tile sizes the launcher passed to
//     fused.kernel_inputs; (INT_MAX, -1) for a tile with none, which meets
//     nothing. Then two running bounds (masks.segment_bounds): the largest
//     id of tiles 0..t (-1 for none) and the smallest id of tiles t..T-1.
//     Placeholders unless params[7].
//   sinks (Hq,): float32 logits in natural units; a placeholder unless
//     params[8].
//   params (int32): [q_len, k_len, n_q_heads, n_kv_heads, array_kind, causal,
//                    window, has_segments, has_sinks, first_tile], window 0 =
//                    none. first_tile: the tile (along the grid's x axis)
//                    of this launch's first threadgroup. A launch split into
//                    pieces (mlx_flash.dispatch) runs tiles [first_tile,
//                    first_tile + threadgroups_per_grid.x) and writes only
//                    their rows, into outputs whose sequence axis holds just
//                    those rows (flash_piece); 0 for a whole launch.
//   fparams (float32): [scale].
//   Backward kernels also take dout (B, Hq, Lq, Dv), any strides, and lse,
//   delta (B, Hq, Lq) float32, row-contiguous.
//
// The keep rule. With offset = k_len - q_len (causal is bottom-right
// aligned), score (i, j) of query position i and key position j is kept iff
//   j < k_len,
//   causal: j <= i + offset,
//   window (only with causal): j > i + offset - window,
//   segments: q_id(i) >= 0 && q_id(i) == k_id(j),
//   bool array: True.
// A dropped score weighs exactly 0 and gets no gradient: it is -inf, never the
// dtype's lowest value. An additive array is added as it is, -inf included,
// so a row whose kept scores are all -inf is NaN, as in MLX.
//
// Rows. The forward writes o = softmax(scale * q k^T + mask) v and lse, the
// natural-log log-sum-exp of the kept scaled scores (sink included); a kernel
// that works in log2 units converts when it writes lse and when it reads it
// back. A row that keeps no key (tracked by a per-row "kept any" flag) gets
// o = 0 and lse = +inf, so the backward's p = exp(s - lse) is 0 there.
//
// Sinks: a key of logit sinks[h] and value zero. The forward's online softmax
// starts from m = sink (m = sink * log2(e) in log2 units) and l = 1 instead of
// m = -inf, l = 0. The backward kernels never read them; their gradient is
// mlx_flash.fused.sink_grad.
//
// Tile skipping. A (query tile, key tile) pair is never visited when the
// causal and window rules keep none of it (flash_key_begin / flash_key_end
// bound a query tile's key loop, flash_row_begin / flash_row_end a key
// tile's query loop) or when its segment ranges cannot meet
// (flash_ranges_meet), and a loop over tiles ends at the last tile whose
// running bound still allows a meeting (flash_max_id_through walking key
// tiles down, flash_min_id_from walking query tiles up), so with causal the
// tiles of other documents are not even tested one by one (without it, the
// later documents' key tiles, or earlier documents' query tiles, are each
// tested and skipped). Every input of those
// decisions is the same for every thread of a threadgroup, so skipping never
// splits a threadgroup at a barrier.
//
// Helpers take values, or pointers through a template parameter: MLX gives an
// input the `device` or the `constant` address space depending on its size,
// so a helper with a fixed pointer type would only compile for one of the two.
//
// MLX puts its own preamble (metal_stdlib, `using namespace metal`, bfloat16)
// in front of the header, so none is included here.

// What the mask_array input holds; the value is params[4] and matches
// mlx_flash.fused.ARRAY_*.
enum FlashArrayKind : int {
  FLASH_ARRAY_NONE = 0, // a placeholder, never read
  FLASH_ARRAY_BOOL = 1, // True keeps the score
  FLASH_ARRAY_ADD = 2, // added to the scaled score as it is
};

// The structure of one attention call, read once from params.
struct FlashMask {
  int q_len;
  int k_len;
  int offset; // k_len - q_len: query i's causal diagonal is key i + offset
  int n_q_heads;
  int n_kv_heads;
  int array_kind; // FlashArrayKind
  bool causal;
  int window; // 0: none; only meaningful with causal
  bool segments;
  bool sinks;
  int first_tile; // this launch's first tile along the grid's x axis
};

// Uniform reads. Every thread of a threadgroup needs the same metadata
// (params, strides, shapes, a tile's id bounds). Lane 0 of each SIMD group
// loads a value and simd_broadcast hands it to the other lanes, so it costs
// one load per SIMD group instead of one per thread; the kernels read their
// metadata once, at the start, into registers (FlashDims, FlashMask), and a
// tile's id bounds once per tile, never again inside the loops over
// elements. These are SIMD collectives: every lane of the SIMD group calls
// them, at the start of a kernel or in tile loops every thread runs alike.
template <typename P>
inline int flash_uniform(P p, int at, ushort lane) {
  return simd_broadcast(lane == 0 ? int(p[at]) : 0, ushort(0));
}

template <typename P>
inline float flash_uniform_float(P p, int at, ushort lane) {
  return simd_broadcast(lane == 0 ? float(p[at]) : 0.0f, ushort(0));
}

template <typename P>
inline int64_t flash_uniform64(P p, int at, ushort lane) {
  const int64_t x = lane == 0 ? int64_t(p[at]) : int64_t(0);
  return as_type<int64_t>(simd_broadcast(as_type<int2>(x), ushort(0)));
}

// N strides (or a shape) of an input, held in registers and indexed as the
// input's own buffer would be, so helpers take either.
template <int N>
struct FlashDims {
  int64_t at[N];
  int64_t operator[](int i) const {
    return at[i];
  }
};

template <int N, typename P>
inline FlashDims<N> flash_dims(P p, ushort lane) {
  FlashDims<N> dims;
  for (int i = 0; i < N; ++i) {
    dims.at[i] = flash_uniform64(p, i, lane);
  }
  return dims;
}

// flash_dims where `needed` (the same in every thread: a uniform branch),
// zeros where the kernel never reads that input.
template <int N, typename P>
inline FlashDims<N> flash_dims_if(bool needed, P p, ushort lane) {
  FlashDims<N> dims;
  for (int i = 0; i < N; ++i) {
    dims.at[i] = needed ? flash_uniform64(p, i, lane) : int64_t(0);
  }
  return dims;
}

template <typename P>
inline FlashMask flash_read_mask(P params, ushort lane) {
  int v[10];
  for (int i = 0; i < 10; ++i) {
    v[i] = flash_uniform(params, i, lane);
  }
  FlashMask mask;
  mask.q_len = v[0];
  mask.k_len = v[1];
  mask.offset = v[1] - v[0];
  mask.n_q_heads = v[2];
  mask.n_kv_heads = v[3];
  mask.array_kind = v[4];
  mask.causal = v[5] != 0;
  mask.window = v[5] != 0 ? v[6] : 0;
  mask.segments = v[7] != 0;
  mask.sinks = v[8] != 0;
  mask.first_tile = v[9];
  return mask;
}

// The rows (queries, or keys for dK/dV) one launch writes: tiles
// [first_tile, first_tile + n_tiles) of `tile_rows` rows each, within
// `length` rows. Outputs hold `count` rows per (batch, head): row r of the
// whole problem is row r - begin of the launch's output.
struct FlashPiece {
  int begin;
  int count;
};

inline FlashPiece flash_piece(FlashMask mask, int tile_rows, uint n_tiles, int length) {
  FlashPiece piece;
  piece.begin = min(mask.first_tile * tile_rows, length);
  piece.count = min((mask.first_tile + int(n_tiles)) * tile_rows, length) - piece.begin;
  return piece;
}

// The first key that any query row at or after `row_begin` can see by the
// causal and window rules.
inline int flash_key_begin(FlashMask mask, int row_begin) {
  return mask.window > 0 ? max(0, row_begin + mask.offset - mask.window + 1) : 0;
}

// One past the last key that any query row before `row_end` can see by the
// causal rule (k_len without it).
inline int flash_key_end(FlashMask mask, int row_end) {
  return mask.causal ? clamp(row_end + mask.offset, 0, mask.k_len) : mask.k_len;
}

// The first query row that can see some key at or after `key_begin`.
inline int flash_row_begin(FlashMask mask, int key_begin) {
  return mask.causal ? clamp(key_begin - mask.offset, 0, mask.q_len) : 0;
}

// One past the last query row that can see some key before `key_end`.
inline int flash_row_end(FlashMask mask, int key_end) {
  return mask.window > 0
      ? clamp(key_end - 1 - mask.offset + mask.window, 0, mask.q_len)
      : mask.q_len;
}

// Whether query row `row` sees key `key` by the position rules: the key
// exists, causal, window. Segments and the array are separate tests.
inline bool flash_position_keeps(FlashMask mask, int row, int key) {
  return key >= flash_key_begin(mask, row) && key < flash_key_end(mask, row + 1);
}

// Whether a query of id `q_id` sees a key of id `k_id`: same document, and
// the query is not padding (a negative id).
inline bool flash_segments_keep(int q_id, int k_id) {
  return q_id >= 0 && q_id == k_id;
}

// Entry `tile` of a (B, T, 4) q_ranges / k_ranges input: (min, max) id.
// Uniform reads (see flash_uniform): every lane of the SIMD group calls it.
template <typename P, typename S>
inline int2 flash_tile_range(P ranges, S strides, int batch, int tile, ushort lane) {
  const int at = int(batch * strides[0] + tile * strides[1]);
  return int2(flash_uniform(ranges, at, lane), flash_uniform(ranges, at + int(strides[2]), lane));
}

// The largest id of tiles 0..tile of a ranges input (-1 if none has one):
// walking tiles downwards, none at or before `tile` meets a range whose
// minimum is above it.
template <typename P, typename S>
inline int flash_max_id_through(P ranges, S strides, int batch, int tile, ushort lane) {
  return flash_uniform(ranges, int(batch * strides[0] + tile * strides[1] + 2 * strides[2]), lane);
}

// The smallest id of tiles tile..T-1 of a ranges input (INT_MAX if none has
// one): walking tiles upwards, none from `tile` on meets a range whose
// maximum is below it.
template <typename P, typename S>
inline int flash_min_id_from(P ranges, S strides, int batch, int tile, ushort lane) {
  return flash_uniform(ranges, int(batch * strides[0] + tile * strides[1] + 3 * strides[2]), lane);
}

// Whether two tiles' id ranges can hold an equal id. A tile with no
// non-negative id has the range (INT_MAX, -1), which meets nothing.
inline bool flash_ranges_meet(int2 q_range, int2 k_range) {
  return q_range.x <= k_range.y && k_range.x <= q_range.y;
}

// Stride of a broadcast axis: a size-1 axis is read at index 0 whatever the
// stride of the underlying array says.
inline int64_t flash_axis_stride(int size, int64_t stride) {
  return size == 1 ? 0 : stride;
}

// exp(x) as one exp2, cheaper than exp. The factor is applied to the
// difference of two scores rather than folded into the scale, so masks stay
// in natural units: scaling an additive mask of float32's lowest value by
// log2(e) would overflow to -inf. precise:: because the softmax relies on
// exp2(-inf) == 0 (dropped scores) and exp2(0) == 1 exactly, which fast math
// does not promise.
constant constexpr float FLASH_LOG2E = 1.44269504088896340736f;

inline float flash_exp(float x) {
  return precise::exp2(x * FLASH_LOG2E);
}

// The maximum to subtract before exponentiating. A running maximum of -inf
// means every score seen so far is -inf (or nothing was seen yet); using 0
// then keeps exp(-inf - max) at 0 instead of exp(-inf + inf) = NaN, so a tile
// whose scores are all -inf cannot poison the rest of its row.
inline float flash_exp_base(float running_max) {
  return running_max == -INFINITY ? 0.0f : running_max;
}
