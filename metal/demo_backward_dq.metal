// Demo backward, dQ: dq = scale * dS k, dS = P * (dP - delta), dP = dout v^T.
//
// Grid: as demo_forward.metal, one threadgroup per (query tile of BQ rows,
// group of H query heads sharing a KV head, batch), H * BQ / 8 SIMD groups;
// SIMD group g owns 8 query rows of one head: its q and dout fragments and
// its dq accumulator stay in registers. The threadgroup walks the key tiles
// the forward visits (the causal / window band, segment ranges that meet),
// staging each K and V tile once for all its heads. Each query row is
// written by exactly one lane: no atomics, deterministic.
//
// Template constants: T, D, BQ, BK as in demo_forward.metal (2 BK >= BQ:
// q and dout are staged through the K/V tiles' memory).
//
// Inputs and params: see flash_common.h; dout (B, Hq, Lq, D) in T; lse from
// the forward (natural log, +inf for a row that keeps no key) and delta =
// rowsum(dout * out), (B, Hq, Lq) float32; all read through their strides.
// Outputs: dq (B, Hq, Lq, D) in T, row-contiguous.

constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;
constexpr int KF = BK / 8;
constexpr int QSG = BQ / 8;

// The K tile, then the V tile; q and dout are staged here first.
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
const FlashDims<4> do_st = flash_dims<4>(dout_strides, lane);
const FlashDims<4> ma_st = flash_dims_if<4>(m.array_kind != FLASH_ARRAY_NONE, mask_array_strides, lane);
const FlashDims<2> qs_st = flash_dims_if<2>(m.segments, q_segments_strides, lane);
const FlashDims<2> ks_st = flash_dims_if<2>(m.segments, k_segments_strides, lane);
const FlashDims<3> qr_st = flash_dims_if<3>(m.segments, q_ranges_strides, lane);
const FlashDims<3> kr_st = flash_dims_if<3>(m.segments, k_ranges_strides, lane);
const FlashDims<3> lse_st = flash_dims<3>(lse_strides, lane);
const FlashDims<3> delta_st = flash_dims<3>(delta_strides, lane);
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

const short2 coord = demo_frag_coord(lane);
const int row = q_start + (sg % QSG) * 8 + coord.y;
const int col = coord.x;
const int safe_row = min(row, m.q_len - 1);
const int64_t mrow = demo_mask_row(ma_shape, ma_st, batch, head, safe_row);
const int64_t msj = flash_axis_stride(ma_shape[3], ma_st[3]);
const int q_id = m.segments
    ? demo_row_segment_id(q_segments, qs_st, batch, q_start + (sg % QSG) * 8, m.q_len, lane, coord.y)
    : 0;
const float row_lse = lse[batch * lse_st[0] + head * lse_st[1] + safe_row * lse_st[2]];
const float row_delta =
    delta[batch * delta_st[0] + head * delta_st[1] + safe_row * delta_st[2]];

// q and dout fragments, loaded once: each head's rows of each staged in turn.
simdgroup_matrix<T, 8, 8> q_frag[DF];
simdgroup_matrix<T, 8, 8> do_frag[DF];
for (int h = 0; h < heads_here; ++h) {
  const int64_t q_base = batch * q_st[0] + (first_head + h) * q_st[1];
  const int64_t do_base = batch * do_st[0] + (first_head + h) * do_st[1];
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
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage<T, BQ, D, LD>(
      k_tile, dout + do_base, do_st[2], do_st[3], q_start, m.q_len, tid, n_threads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (head_slot == h) {
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      simdgroup_load(do_frag[d], k_tile + ((sg % QSG) * 8) * LD + d * 8, LD);
    }
  }
}

simdgroup_matrix<float, 8, 8> dq_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  dq_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}

const int key_begin = flash_key_begin(m, q_start);
const int key_end = flash_key_end(m, q_start + BQ);
const int2 q_range = m.segments ? flash_tile_range(q_ranges, qr_st, batch, q_tile_index, lane) : int2(0);
bool kept = false;  // unused: the forward's lse already says which rows keep nothing

// From the last key tile down, as the forward walks them.
const int k_first = (key_begin / BK) * BK;
const int k_last = key_end > k_first ? k_first + (key_end - 1 - k_first) / BK * BK : k_first - BK;
for (int k_start = k_last; k_start >= k_first; k_start -= BK) {
  if (m.segments) {
    if (flash_max_id_through(k_ranges, kr_st, batch, k_start / BK, lane) < q_range.x) {
      break;
    }
    if (!flash_ranges_meet(q_range, flash_tile_range(k_ranges, kr_st, batch, k_start / BK, lane))) {
      continue;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  demo_stage_keys<T, BK, D, LD>(
      k_tile, v_tile, k_ids, k + k_base, k_st, v + v_base, v_st, k_segments,
      ks_st, m, batch, k_start, tid, n_threads);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // S = q K^T and dP = dout V^T: (8, D) x (D, BK) each.
  simdgroup_matrix<float, 8, 8> s[KF];
  simdgroup_matrix<float, 8, 8> dp[KF];
  DEMO_UNROLL
  for (int j = 0; j < KF; ++j) {
    s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dp[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_t;
      simdgroup_matrix<T, 8, 8> v_t;
      simdgroup_load(k_t, k_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_load(v_t, v_tile + (j * 8) * LD + d * 8, LD, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(s[j], q_frag[d], k_t, s[j]);
      simdgroup_multiply_accumulate(dp[j], do_frag[d], v_t, dp[j]);
    }
  }

  // P = exp(S - lse) (0 where dropped and in rows that keep nothing) and
  // dS = P * (dP - delta).
  const bool full = demo_tile_full(m, q_start, q_start + BQ, k_start, k_start + BK);
  simdgroup_matrix<T, 8, 8> ds[KF];
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
      const float w = demo_exp2((score - row_lse) * FLASH_LOG2E);
      ds[j].thread_elements()[e] = T(w * (dp[j].thread_elements()[e] - row_delta));
    }
  }

  // dq += dS K: (8, BK) x (BK, D).
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    DEMO_UNROLL
    for (int j = 0; j < KF; ++j) {
      simdgroup_matrix<T, 8, 8> k_frag;
      simdgroup_load(k_frag, k_tile + (j * 8) * LD + d * 8, LD);
      simdgroup_multiply_accumulate(dq_acc[d], ds[j], k_frag, dq_acc[d]);
    }
  }
}

if (row < m.q_len) {
  device T* dq_row = dq + (size_t(batch * m.n_q_heads + head) * piece.count + (row - piece.begin)) * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    *reinterpret_cast<device vec<T, 2>*>(dq_row + d * 8 + col) = vec<T, 2>(
        T(dq_acc[d].thread_elements()[0] * scale), T(dq_acc[d].thread_elements()[1] * scale));
  }
}
