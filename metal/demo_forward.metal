// Demo forward: out = softmax(scale * q k^T + mask) v, one pass, O(L) memory.
//
// Grid: one threadgroup per (query tile of BQ rows, group of H query heads,
// batch), with H * BQ / 8 SIMD groups; H (threads / (BQ * 4)) divides the
// GQA group, so the H heads share one KV head. SIMD group g serves head
// g / (BQ / 8) and owns its query rows [8 (g % (BQ / 8)), + 8) of the tile
// from start to end: its Q fragments, output accumulator and softmax
// statistics stay in registers. The threadgroup walks the key tiles, and each K
// and V tile is staged once in threadgroup memory and read by every SIMD
// group, of every head.
//
// Only key tiles the causal / window band of the query tile reaches are
// visited, from the last down; with segment ids a key tile whose id range
// cannot meet the query tile's is skipped before it is staged, and the walk
// ends where no tile below holds an id of the query tile, so a packed row
// costs the sum of its documents' squared lengths and a window O(L * window).
//
// Template constants: T (half or bfloat), D (head dim of q, k and v), BQ
// (query rows per head, a multiple of 8), BK (keys per tile, a multiple of
// 8, 2 BK >= BQ: Q is staged through the K/V tiles' memory).
//
// Inputs and params: see flash_common.h. q_ranges / k_ranges are per BQ
// queries and per BK keys.
// Outputs: out (B, Hq, Lq, D) in T, row-contiguous; lse (B, Hq, Lq) float32,
// the natural log-sum-exp of the kept scores (sink included), +inf for a row
// that keeps no key (its output is 0).

constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;   // fragments across the head dim
constexpr int KF = BK / 8;  // fragments across a key tile
constexpr int QSG = BQ / 8; // SIMD groups per query head

// The K tile, then the V tile; Q is staged here first, one head at a time.
threadgroup vec<T, 4> kv_storage[2 * BK * LD / 4];
threadgroup int k_ids[BK];
threadgroup T* k_tile = demo_elements<T>(kv_storage);
threadgroup T* v_tile = k_tile + BK * LD;

const uint tid = thread_index_in_threadgroup;
const uint n_threads = threads_per_threadgroup.x;
const ushort sg = simdgroup_index_in_threadgroup;
const ushort lane = thread_index_in_simdgroup;
// Metadata, read once into registers (flash_common.h, uniform reads).
const FlashMask m = flash_read_mask(params, lane);
const FlashDims<4> q_st = flash_dims<4>(q_strides, lane);
const FlashDims<4> k_st = flash_dims<4>(k_strides, lane);
const FlashDims<4> v_st = flash_dims<4>(v_strides, lane);
const FlashDims<4> ma_st = flash_dims_if<4>(m.array_kind != FLASH_ARRAY_NONE, mask_array_strides, lane);
const FlashDims<2> qs_st = flash_dims_if<2>(m.segments, q_segments_strides, lane);
const FlashDims<2> ks_st = flash_dims_if<2>(m.segments, k_segments_strides, lane);
const FlashDims<3> qr_st = flash_dims_if<3>(m.segments, q_ranges_strides, lane);
const FlashDims<3> kr_st = flash_dims_if<3>(m.segments, k_ranges_strides, lane);
const FlashDims<4> ma_shape = flash_dims_if<4>(m.array_kind != FLASH_ARRAY_NONE, mask_array_shape, lane);

const int heads_here = int(n_threads) / (QSG * 32);
const int batch = threadgroup_position_in_grid.z;
const int q_tile_index = m.first_tile + int(threadgroup_position_in_grid.x);
// The query rows this launch writes (all of them unless it is a piece).
const FlashPiece piece = flash_piece(m, BQ, threadgroups_per_grid.x, m.q_len);
const int q_start = q_tile_index * BQ;
const int first_head = threadgroup_position_in_grid.y * heads_here;
const int head_slot = sg / QSG;
const int head = first_head + head_slot;
const int kv_head = first_head / (m.n_q_heads / m.n_kv_heads);
const float scale = flash_uniform_float(fparams, 0, lane);

const int64_t k_base = batch * k_st[0] + kv_head * k_st[1];
const int64_t v_base = batch * v_st[0] + kv_head * v_st[1];

// This lane's row of the tile, and the first of its two columns in every
// fragment. Rows past the end are computed but never stored; their mask
// and id reads use the last row so they stay in bounds.
const short2 coord = demo_frag_coord(lane);
const int row = q_start + (sg % QSG) * 8 + coord.y;
const int col = coord.x;
const int safe_row = min(row, m.q_len - 1);
const int64_t mrow = demo_mask_row(ma_shape, ma_st, batch, head, safe_row);
const int64_t msj = flash_axis_stride(ma_shape[3], ma_st[3]);
const int q_id = m.segments
    ? demo_row_segment_id(q_segments, qs_st, batch, q_start + (sg % QSG) * 8, m.q_len, lane, coord.y)
    : 0;

// Q fragments, loaded once: each head's rows staged in turn.
simdgroup_matrix<T, 8, 8> q_frag[DF];
for (int h = 0; h < heads_here; ++h) {
  const int64_t q_base = batch * q_st[0] + (first_head + h) * q_st[1];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage<T, BQ, D, LD>(
      k_tile, q + q_base, q_st[2], q_st[3], q_start, m.q_len, tid, n_threads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (head_slot == h) {
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      simdgroup_load(q_frag[d], k_tile + ((sg % QSG) * 8) * LD + d * 8, LD);
    }
  }
}

simdgroup_matrix<float, 8, 8> o_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  o_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
// A sink is one more key of logit `sink` and value 0: the softmax starts
// from it.
float row_max = m.sinks ? float(sinks[head]) : -INFINITY;
float row_sum = m.sinks ? 1.0f : 0.0f;
bool kept = false;

const int key_begin = flash_key_begin(m, q_start);
const int key_end = flash_key_end(m, q_start + BQ);
const int2 q_range = m.segments ? flash_tile_range(q_ranges, qr_st, batch, q_tile_index, lane) : int2(0);

// Walked from the last key tile down; with segment ids the walk ends where
// no tile below holds an id of this query tile.
const int k_first = (key_begin / BK) * BK;
const int k_last = key_end > k_first ? k_first + (key_end - 1 - k_first) / BK * BK : k_first - BK;
for (int k_start = k_last; k_start >= k_first; k_start -= BK) {
  if (m.segments) {
    if (flash_max_id_through(k_ranges, kr_st, batch, k_start / BK, lane) < q_range.x) {
      break;
    }
    if (!flash_ranges_meet(q_range, flash_tile_range(k_ranges, kr_st, batch, k_start / BK, lane))) {
      continue;  // no query of the tile shares a document with a key of it
    }
  }
  // Everyone is done with Q (first tile) or the previous K/V tile.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage_keys<T, BK, D, LD>(
      k_tile, v_tile, k_ids, k + k_base, k_st, v + v_base, v_st, k_segments,
      ks_st, m, batch, k_start, tid, n_threads);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S = Q K^T for this SIMD group's 8 rows: (8, D) x (D, BK).
  simdgroup_matrix<float, 8, 8> s[KF];
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_t;
      simdgroup_load(k_t, k_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(s[j], q_frag[d], k_t, s[j]);
    }
  }

  // Scale, mask, and the tile's row max.
  const bool full = demo_tile_full(m, q_start, q_start + BQ, k_start, k_start + BK);
  float tile_max = -INFINITY;
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    DEMO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int key_in_tile = j * 8 + col + e;
      const float score = demo_masked_score(
          s[j].thread_elements()[e] * scale,
          m,
          full,
          row,
          k_start + key_in_tile,
          q_id,
          m.segments ? k_ids[key_in_tile] : 0,
          mask_array,
          mrow,
          msj,
          kept);
      s[j].thread_elements()[e] = score;
      tile_max = max(tile_max, score);
    }
  }
  const float new_max = max(row_max, demo_row_max(tile_max));
  // A row that has seen only -inf so far subtracts 0 instead of -inf, so its
  // weights are exp2(-inf) = 0 rather than NaN and later tiles still count.
  const float shift = (new_max == -INFINITY) ? 0.0f : new_max;
  // Exactly 0 after a row of -inf, exactly 1 when the max did not move.
  const float correction = precise::exp2((row_max - shift) * FLASH_LOG2E);

  // P = exp(S - max), rounded to T for the P V product.
  simdgroup_matrix<T, 8, 8> p[KF];
  float tile_sum = 0.0f;
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    DEMO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const float w = demo_exp2((s[j].thread_elements()[e] - shift) * FLASH_LOG2E);
      tile_sum += w;
      p[j].thread_elements()[e] = T(w);
    }
  }
  row_sum = row_sum * correction + demo_row_sum(tile_sum);
  row_max = new_max;

  // O = O * correction + P V: (8, BK) x (BK, D).
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    o_acc[d].thread_elements()[0] *= correction;
    o_acc[d].thread_elements()[1] *= correction;
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> v_frag;
      simdgroup_load(v_frag, v_tile + (j * 8) * LD + d * 8, LD);
      simdgroup_multiply_accumulate(o_acc[d], p[j], v_frag, o_acc[d]);
    }
  }
}

// A row that kept a key divides by its sum (0 for a row of -inf scores:
// NaN, as MLX gives); one that kept none is 0 with lse +inf.
const bool row_kept = demo_row_any(kept);
if (row < m.q_len) {
  const float inv_sum = row_kept ? 1.0f / row_sum : 0.0f;
  const size_t row_index = size_t(batch * m.n_q_heads + head) * piece.count + (row - piece.begin);
  device T* out_row = out + row_index * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    // col is even and rows are D (a multiple of 8) elements: 4-byte aligned.
    *reinterpret_cast<device vec<T, 2>*>(out_row + d * 8 + col) = vec<T, 2>(
        T(o_acc[d].thread_elements()[0] * inv_sum), T(o_acc[d].thread_elements()[1] * inv_sum));
  }
  if (col == 0) {
    const float base = (row_max == -INFINITY) ? 0.0f : row_max;
    lse[row_index] = row_kept ? base + precise::log(row_sum) : INFINITY;
  }
}
