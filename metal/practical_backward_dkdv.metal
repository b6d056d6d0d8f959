// Practical flash-attention backward, dK and dV (FlashAttention-2): a
// threadgroup owns a block of keys of one KV head and walks the query tiles
// that can see it, of every query head sharing that KV head, accumulating
//   P  = exp(scale * Q K^T + mask - lse)       (recomputed, never stored)
//   dV += P^T dO
//   dS = P * (dO V^T - delta)
//   dK += scale * dS^T Q
// so dK and dV are written once, with no atomics and in a fixed order.
//
// Inputs: flash_common.h (the backward's dout, lse, delta included).
// Outputs: dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, DV) in T.
// Grid: threadgroups (ceil(Lk / (NSG * KPS)), Hkv, B) of NSG * 32 threads.
//
// Template constants: T, D, DV, NSG, KPS (keys per simdgroup), BQ (query
// positions per staged tile: 32, 16 or 8).
//
// The block's K and V stay in threadgroup memory; Q and dO tiles of BQ
// positions of one head are staged in turn, with their lse, delta and
// document ids (each read once from device memory instead of by every
// lane that pairs the query with a key). Per query tile: lane (c, i) of
// the simdgroup's (32 / BQ) x BQ lanes computes S and dP of query i against
// the simdgroup's keys c, c + 32 / BQ, ... (each pair once, by one lane),
// then P and dS into threadgroup memory; lanes over columns accumulate
// dV += P^T dO and dK += dS^T Q for the simdgroup's KPS keys.

constexpr int NT = NSG * 32;
constexpr int BKV = NSG * KPS; // keys per threadgroup
constexpr int LK = 32 / BQ; // lane-rows in the score phase
constexpr int KL = KPS / LK; // keys per lane in the score phase
constexpr int D4 = (D + 3) / 4 + 1;
constexpr int DV4 = (DV + 3) / 4 + 1;
constexpr int DT = (D + 31) / 32;
constexpr int DVT = (DV + 31) / 32;

threadgroup vec<T, 4> k_block[BKV * D4];
threadgroup vec<T, 4> v_block[BKV * DV4];
threadgroup vec<T, 4> q_tile[BQ * D4];
threadgroup vec<T, 4> do_tile[BQ * DV4];
threadgroup float p_tile[BKV * BQ];
threadgroup float ds_tile[BKV * BQ];
threadgroup float lse_tile[BQ];
threadgroup float delta_tile[BQ];
threadgroup int q_id_tile[BQ];


const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
// Metadata, read once into registers (flash_common.h, uniform reads).
const FlashMask mask = flash_read_mask(params, ushort(lane));
const FlashDims<4> q_st = flash_dims<4>(q_strides, ushort(lane));
const FlashDims<4> k_st = flash_dims<4>(k_strides, ushort(lane));
const FlashDims<4> v_st = flash_dims<4>(v_strides, ushort(lane));
const FlashDims<4> do_st = flash_dims<4>(dout_strides, ushort(lane));
const FlashDims<4> ma_st = flash_dims_if<4>(mask.array_kind != FLASH_ARRAY_NONE, mask_array_strides, ushort(lane));
const FlashDims<2> qs_st = flash_dims_if<2>(mask.segments, q_segments_strides, ushort(lane));
const FlashDims<2> ks_st = flash_dims_if<2>(mask.segments, k_segments_strides, ushort(lane));
const FlashDims<3> qr_st = flash_dims_if<3>(mask.segments, q_ranges_strides, ushort(lane));
const FlashDims<3> kr_st = flash_dims_if<3>(mask.segments, k_ranges_strides, ushort(lane));
const FlashDims<4> ma_shape = flash_dims_if<4>(mask.array_kind != FLASH_ARRAY_NONE, mask_array_shape, ushort(lane));
const float scale = flash_uniform_float(fparams, 0, ushort(lane));
const int sg = simdgroup_index_in_threadgroup;
const int key_block = mask.first_tile + int(threadgroup_position_in_grid.x);
// The keys this launch writes (all of them unless it is a piece).
const FlashPiece piece = flash_piece(mask, BKV, threadgroups_per_grid.x, mask.k_len);
const int kv_head = threadgroup_position_in_grid.y;
const int batch = threadgroup_position_in_grid.z;
const int group = mask.n_q_heads / mask.n_kv_heads;
const int key_begin = key_block * BKV;
const int key_end = min(key_begin + BKV, mask.k_len);

const PracticalArrayStrides array_strides =
    practical_array_strides(ma_shape, ma_st);

practical_stage<T, BKV, D4, NT>(
    k_block, k, batch * k_st[0] + kv_head * k_st[1], 0, k_st[2],
    k_st[3], 1, BKV, key_begin, mask.k_len, D, tid);
practical_stage<T, BKV, DV4, NT>(
    v_block, v, batch * v_st[0] + kv_head * v_st[1], 0, v_st[2],
    v_st[3], 1, BKV, key_begin, mask.k_len, DV, tid);

// Score-phase keys of this lane: simdgroup key lk + LK * u.
const int lk = lane / BQ;
const int i = lane % BQ;
int key[KL];
int k_id[KL];
for (int u = 0; u < KL; ++u) {
  key[u] = key_begin + sg * KPS + lk + LK * u;
  k_id[u] = practical_key_id(mask, k_segments, ks_st, batch, key[u]);
}

float dk_acc[KPS][DT];
float dv_acc[KPS][DVT];
for (int c = 0; c < KPS; ++c) {
  for (int t = 0; t < DT; ++t) {
    dk_acc[c][t] = 0.0f;
  }
  for (int t = 0; t < DVT; ++t) {
    dv_acc[c][t] = 0.0f;
  }
}

// Query rows that the causal and window rules let see some key of the block.
const int row_begin = flash_row_begin(mask, key_begin);
const int row_end = flash_row_end(mask, key_end);
const int2 k_range = mask.segments
    ? flash_tile_range(k_ranges, kr_st, batch, key_block, ushort(lane))
    : int2(0, 0);

for (int g = 0; g < group; ++g) {
  const int head = kv_head * group + g;
  const int64_t q_base = batch * q_st[0] + head * q_st[1];
  const int64_t do_base = batch * do_st[0] + head * do_st[1];
  const int64_t stat_base = (int64_t(batch) * mask.n_q_heads + head) * mask.q_len;

  for (int q0 = (row_begin / BQ) * BQ; q0 < row_end; q0 += BQ) {
    if (mask.segments) {
      // No query tile from here on holds an id of this key block.
      if (flash_min_id_from(q_ranges, qr_st, batch, q0 / BQ, ushort(lane)) > k_range.y) {
        break;
      }
      if (!flash_ranges_meet(flash_tile_range(q_ranges, qr_st, batch, q0 / BQ, ushort(lane)), k_range)) {
        continue;
      }
    }
    // Every simdgroup is done with the previous tile before it is overwritten.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    practical_stage<T, BQ, D4, NT>(
        q_tile, q, q_base, 0, q_st[2], q_st[3], 1, BQ, q0, mask.q_len, D, tid);
    practical_stage<T, BQ, DV4, NT>(
        do_tile, dout, do_base, 0, do_st[2], do_st[3], 1, BQ, q0, mask.q_len, DV, tid);
    for (int t = tid; t < BQ; t += NT) {
      // Queries past the end: lse +inf, so their weights are exactly 0.
      const int pos = q0 + t;
      const bool valid = pos < mask.q_len;
      lse_tile[t] = valid ? lse[stat_base + pos] : INFINITY;
      delta_tile[t] = valid ? delta[stat_base + pos] : 0.0f;
      q_id_tile[t] = practical_query_id(mask, q_segments, qs_st, batch, pos, valid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Query i of the tile: its part of the mask, lse and delta.
    const int pos = q0 + i;
    const PracticalRow row =
        practical_row_of(mask, array_strides, q_id_tile[i], batch, head, pos, pos < mask.q_len);
    const float row_lse = lse_tile[i];
    const float row_delta = delta_tile[i];

    float s[KL];
    float dp[KL];
    practical_dots<T, KL, D4>(s, k_block + (sg * KPS + lk) * D4, LK * D4, q_tile + i * D4);
    practical_dots<T, KL, DV4>(dp, v_block + (sg * KPS + lk) * DV4, LK * DV4, do_tile + i * DV4);
    for (int u = 0; u < KL; ++u) {
      bool keep;
      const float x = practical_masked_score(
          mask, row, key[u], k_id[u], mask_array, array_strides.key, s[u] * scale, keep);
      // A dropped score is a constant: no weight, no gradient.
      const float p = keep ? flash_exp(x - row_lse) : 0.0f;
      const int at = (sg * KPS + lk + LK * u) * BQ + i;
      p_tile[at] = p;
      ds_tile[at] = p * (dp[u] - row_delta);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    practical_accumulate<T, KPS, BQ, DVT, DV4>(dv_acc, p_tile + sg * KPS * BQ, do_tile, lane, DV);
    practical_accumulate<T, KPS, BQ, DT, D4>(dk_acc, ds_tile + sg * KPS * BQ, q_tile, lane, D);
  }
}

for (int c = 0; c < KPS; ++c) {
  const int key_c = key_begin + sg * KPS + c;
  if (key_c < mask.k_len) {
    const int64_t out_row = (int64_t(batch) * mask.n_kv_heads + kv_head) * piece.count + key_c - piece.begin;
    for (int t = 0; t < DT; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        dk[out_row * D + d] = static_cast<T>(scale * dk_acc[c][t]);
      }
    }
    for (int t = 0; t < DVT; ++t) {
      const int d = lane + 32 * t;
      if (d < DV) {
        dv[out_row * DV + d] = static_cast<T>(dv_acc[c][t]);
      }
    }
  }
}
