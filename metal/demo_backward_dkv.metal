// Demo backward, dK and dV: dv = P^T dout, dk = scale * dS^T q.
//
// Grid: one threadgroup per (key tile of BK keys, KV head, batch), with
// BK / 8 SIMD groups; SIMD group g owns keys [8g, 8g + 8) of the tile: their
// v fragments and the dk, dv accumulators stay in registers, and the k tile
// stays in threadgroup memory (reading its fragments there again for every
// query tile keeps the lane's registers to the accumulators, see
// mlx_flash.demo.Tiles). The threadgroup walks every query head that shares
// this KV head (GQA) and, for each, the query tiles that can keep a key of
// the tile: the causal / window band, and with segment ids only tiles whose
// id range meets the key tile's, skipped before anything is staged. Each
// q and dout tile is staged once for all SIMD groups. The products are taken
// transposed (keys as rows), so P^T and dS^T come straight out of the
// accumulators and every key row is written by exactly one lane: no atomics,
// deterministic.
//
// Template constants: T, D, BQ (queries per staged tile), BK (keys per
// threadgroup).
//
// Inputs and params: see flash_common.h (q_ranges per BQ queries, k_ranges
// per BK keys); dout, lse and delta as in demo_backward_dq.metal.
// Outputs: dk and dv (B, Hkv, Lk, D) in T, row-contiguous.

constexpr int LD = D + DEMO_PAD;
constexpr int DF = D / 8;
constexpr int QF = BQ / 8;  // fragments across a query tile

// v is staged in the k tile's memory first; then it holds k for good.
threadgroup vec<T, 4> k_storage[BK * LD / 4];
threadgroup vec<T, 4> q_storage[BQ * LD / 4];
threadgroup vec<T, 4> do_storage[BQ * LD / 4];
threadgroup float lse_tile[BQ];
threadgroup float delta_tile[BQ];
threadgroup int q_ids[BQ];
threadgroup T* k_tile = demo_elements<T>(k_storage);
threadgroup T* q_tile = demo_elements<T>(q_storage);
threadgroup T* do_tile = demo_elements<T>(do_storage);

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

const int batch = threadgroup_position_in_grid.z;
const int kv_head = threadgroup_position_in_grid.y;
const int k_tile_index = m.first_tile + int(threadgroup_position_in_grid.x);
// The keys this launch writes (all of them unless it is a piece).
const FlashPiece piece = flash_piece(m, BK, threadgroups_per_grid.x, m.k_len);
const int k_start = k_tile_index * BK;
const int group = m.n_q_heads / m.n_kv_heads;
const float scale = flash_uniform_float(fparams, 0, lane);

const int64_t k_base = batch * k_st[0] + kv_head * k_st[1];
const int64_t v_base = batch * v_st[0] + kv_head * v_st[1];
const size_t key_offset = size_t(batch * m.n_kv_heads + kv_head) * piece.count;

// This lane's key (fragment row) and the first of its two query columns.
const short2 coord = demo_frag_coord(lane);
const int key = k_start + sg * 8 + coord.y;
const int col = coord.x;
const int k_id =
    m.segments ? demo_row_segment_id(k_segments, ks_st, batch, k_start + sg * 8, m.k_len, lane, coord.y) : 0;
const int64_t msi = flash_axis_stride(ma_shape[2], ma_st[2]);
const int64_t msj = flash_axis_stride(ma_shape[3], ma_st[3]);

// v fragments (keys as rows), loaded once; then k, read from threadgroup
// memory at every query tile.
demo_stage<T, BK, D, LD>(
    k_tile, v + v_base, v_st[2], v_st[3], k_start, m.k_len, tid, n_threads);
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> v_frag[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  simdgroup_load(v_frag[d], k_tile + (sg * 8) * LD + d * 8, LD);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
demo_stage<T, BK, D, LD>(
    k_tile, k + k_base, k_st[2], k_st[3], k_start, m.k_len, tid, n_threads);

simdgroup_matrix<float, 8, 8> dk_acc[DF];
simdgroup_matrix<float, 8, 8> dv_acc[DF];
DEMO_UNROLL
for (int d = 0; d < DF; ++d) {
  dk_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  dv_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}

const int row_begin = flash_row_begin(m, k_start);
const int row_end = flash_row_end(m, min(k_start + BK, m.k_len));
const int2 k_range = m.segments ? flash_tile_range(k_ranges, kr_st, batch, k_tile_index, lane) : int2(0);
bool kept = false;  // unused: the forward's lse already says which rows keep nothing

for (int g = 0; g < group; ++g) {
  const int head = kv_head * group + g;
  const int64_t q_base = batch * q_st[0] + head * q_st[1];
  const int64_t do_base = batch * do_st[0] + head * do_st[1];
  const int64_t mask_head = demo_mask_row(ma_shape, ma_st, batch, head, 0);

  for (int q_start = (row_begin / BQ) * BQ; q_start < row_end; q_start += BQ) {
    if (m.segments) {
      // No query tile from here on holds an id of this key tile.
      if (flash_min_id_from(q_ranges, qr_st, batch, q_start / BQ, lane) > k_range.y) {
        break;
      }
      if (!flash_ranges_meet(flash_tile_range(q_ranges, qr_st, batch, q_start / BQ, lane), k_range)) {
        continue;  // no query of the tile shares a document with a key of it
      }
    }
    // Everyone is done with the previous q/dout tile (and the k tile is
    // staged, the first time).
    threadgroup_barrier(mem_flags::mem_threadgroup);
    demo_stage<T, BQ, D, LD>(
        q_tile, q + q_base, q_st[2], q_st[3], q_start, m.q_len, tid, n_threads);
    demo_stage<T, BQ, D, LD>(
        do_tile, dout + do_base, do_st[2], do_st[3], q_start, m.q_len, tid, n_threads);
    for (uint i = tid; i < uint(BQ); i += n_threads) {
      // Queries past the end get lse +inf: their weights are exactly 0.
      const int query = q_start + int(i);
      const int safe = min(query, m.q_len - 1);
      const bool inside = query < m.q_len;
      lse_tile[i] =
          inside ? lse[batch * lse_st[0] + head * lse_st[1] + safe * lse_st[2]]
                 : INFINITY;
      delta_tile[i] = inside
          ? delta[batch * delta_st[0] + head * delta_st[1] + safe * delta_st[2]]
          : 0.0f;
      q_ids[i] = m.segments ? demo_segment_id(q_segments, qs_st, batch, safe) : 0;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S^T = k q^T and dP^T = v dout^T: (8, D) x (D, BQ) each.
    simdgroup_matrix<float, 8, 8> s_t[QF];
    simdgroup_matrix<float, 8, 8> dp_t[QF];
    DEMO_UNROLL
    for (int i = 0; i < QF; ++i) {
      s_t[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      dp_t[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      simdgroup_matrix<T, 8, 8> k_f;
      simdgroup_load(k_f, k_tile + (sg * 8) * LD + d * 8, LD);
      DEMO_UNROLL
      for (int i = 0; i < QF; ++i) {
        simdgroup_matrix<T, 8, 8> q_t;
        simdgroup_matrix<T, 8, 8> do_t;
        simdgroup_load(q_t, q_tile + (i * 8) * LD + d * 8, LD, ulong2(0, 0), true);
        simdgroup_load(do_t, do_tile + (i * 8) * LD + d * 8, LD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s_t[i], k_f, q_t, s_t[i]);
        simdgroup_multiply_accumulate(dp_t[i], v_frag[d], do_t, dp_t[i]);
      }
    }

    // P^T = exp(S^T - lse) (0 where dropped, for queries past the end and
    // in rows that keep nothing) and dS^T = P^T * (dP^T - delta).
    const bool full = demo_tile_full(m, q_start, q_start + BQ, k_start, k_start + BK);
    simdgroup_matrix<T, 8, 8> p_t[QF];
    simdgroup_matrix<T, 8, 8> ds_t[QF];
    DEMO_UNROLL
    for (int i = 0; i < QF; ++i) {
      DEMO_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int qi = i * 8 + col + e;
        const int query = q_start + qi;
        const float score = demo_masked_score(
            s_t[i].thread_elements()[e] * scale,
            m,
            full,
            query,
            key,
            q_ids[qi],
            k_id,
            mask_array,
            mask_head + min(query, m.q_len - 1) * msi,
            msj,
            kept);
        const float w = demo_exp2((score - lse_tile[qi]) * FLASH_LOG2E);
        p_t[i].thread_elements()[e] = T(w);
        ds_t[i].thread_elements()[e] = T(w * (dp_t[i].thread_elements()[e] - delta_tile[qi]));
      }
    }

    // dv += P^T dout and dk += dS^T q: (8, BQ) x (BQ, D) each.
    DEMO_UNROLL
    for (int d = 0; d < DF; ++d) {
      DEMO_UNROLL
      for (int i = 0; i < QF; ++i) {
        simdgroup_matrix<T, 8, 8> do_f;
        simdgroup_matrix<T, 8, 8> q_f;
        simdgroup_load(do_f, do_tile + (i * 8) * LD + d * 8, LD);
        simdgroup_load(q_f, q_tile + (i * 8) * LD + d * 8, LD);
        simdgroup_multiply_accumulate(dv_acc[d], p_t[i], do_f, dv_acc[d]);
        simdgroup_multiply_accumulate(dk_acc[d], ds_t[i], q_f, dk_acc[d]);
      }
    }
  }
}

if (key < m.k_len) {
  device T* dk_row = dk + (key_offset + key - piece.begin) * D;
  device T* dv_row = dv + (key_offset + key - piece.begin) * D;
  DEMO_UNROLL
  for (int d = 0; d < DF; ++d) {
    *reinterpret_cast<device vec<T, 2>*>(dk_row + d * 8 + col) = vec<T, 2>(
        T(dk_acc[d].thread_elements()[0] * scale), T(dk_acc[d].thread_elements()[1] * scale));
    *reinterpret_cast<device vec<T, 2>*>(dv_row + d * 8 + col) =
        vec<T, 2>(T(dv_acc[d].thread_elements()[0]), T(dv_acc[d].thread_elements()[1]));
  }
}
