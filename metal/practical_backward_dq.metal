// Practical flash-attention backward, dQ (FlashAttention-2): a threadgroup
// owns a query tile and walks the key tiles it can see, accumulating
//   P  = exp(scale * Q K^T + mask - lse)       (recomputed, never stored)
//   dS = P * (dO V^T - delta)
//   dQ += scale * dS K
// so dQ is written once, with no atomics and in a fixed order.
//
// Inputs: flash_common.h (the backward's dout, lse, delta included).
// Output: dq (B, Hq, Lq, D) in T. Grid, template constants and the query
// tile (heads x positions, GQA heads sharing each K/V tile): as
// practical_forward.metal.
//
// Per key tile: lane (r, j) computes S and dP of key j against its rows
// (each pair once, by one lane), then P and dS; lanes over columns of D
// accumulate dQ += dS K with dS read from threadgroup memory.

constexpr int NT = NSG * 32;
constexpr int BQ = NSG * R;
constexpr int LR = 32 / BK;
constexpr int RL = R / LR;
constexpr int D4 = (D + 3) / 4 + 1; // Q and K tile rows, padded
constexpr int DV4 = (DV + 3) / 4 + 1; // dO and V tile rows, padded
constexpr int DT = (D + 31) / 32; // dQ columns per lane

threadgroup vec<T, 4> q_tile[BQ * D4];
threadgroup vec<T, 4> do_tile[BQ * DV4];
threadgroup vec<T, 4> k_tile[BK * D4];
threadgroup vec<T, 4> v_tile[BK * DV4];
threadgroup float ds_tile[BQ * BK];
threadgroup int k_id_tile[BK]; // the key tile's document ids (practical_key_id)

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
const int batch = threadgroup_position_in_grid.z;
const PracticalQueryTile tile =
    practical_query_tile(mask, threadgroup_position_in_grid, threadgroups_per_grid, BQ);
const PracticalArrayStrides array_strides =
    practical_array_strides(ma_shape, ma_st);

practical_stage<T, BQ, D4, NT>(
    q_tile, q, batch * q_st[0] + tile.first_head * q_st[1], q_st[1],
    q_st[2], q_st[3], tile.heads, tile.rows_used, tile.pos_begin, mask.q_len, D, tid);
practical_stage<T, BQ, DV4, NT>(
    do_tile, dout, batch * do_st[0] + tile.first_head * do_st[1], do_st[1],
    do_st[2], do_st[3], tile.heads, tile.rows_used, tile.pos_begin, mask.q_len, DV, tid);

const int lr = lane / BK;
const int j = lane % BK;
PracticalRow rows[RL];
float row_lse[RL];
float row_delta[RL];
for (int u = 0; u < RL; ++u) {
  const int f = sg * R + lr + LR * u;
  const int pos = tile.pos_begin + f / tile.heads;
  const int head = tile.first_head + f % tile.heads;
  const bool valid = f < tile.rows_used && pos < mask.q_len;
  rows[u] = practical_row(
      mask, array_strides, q_segments, qs_st, batch, head, pos, valid);
  const int64_t stat = (int64_t(batch) * mask.n_q_heads + head) * mask.q_len + pos;
  row_lse[u] = valid ? lse[stat] : INFINITY;
  row_delta[u] = valid ? delta[stat] : 0.0f;
}

float dq_acc[R][DT];
for (int r = 0; r < R; ++r) {
  for (int t = 0; t < DT; ++t) {
    dq_acc[r][t] = 0.0f;
  }
}

const int key_begin = flash_key_begin(mask, tile.pos_begin);
const int key_end = flash_key_end(mask, tile.pos_end);
const int2 q_range = mask.segments
    ? flash_tile_range(q_ranges, qr_st, batch, mask.first_tile + int(threadgroup_position_in_grid.x), ushort(lane))
    : int2(0, 0);
const int64_t k_base = batch * k_st[0] + tile.kv_head * k_st[1];
const int64_t v_base = batch * v_st[0] + tile.kv_head * v_st[1];

// From the last key tile down, as the forward walks them.
const int k_first = (key_begin / BK) * BK;
const int k_last = key_end > k_first ? k_first + (key_end - 1 - k_first) / BK * BK : k_first - BK;
for (int k0 = k_last; k0 >= k_first; k0 -= BK) {
  if (mask.segments) {
    if (flash_max_id_through(k_ranges, kr_st, batch, k0 / BK, ushort(lane)) < q_range.x) {
      break;
    }
    if (!flash_ranges_meet(q_range, flash_tile_range(k_ranges, kr_st, batch, k0 / BK, ushort(lane)))) {
      continue;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  practical_stage<T, BK, D4, NT>(
      k_tile, k, k_base, 0, k_st[2], k_st[3], 1, BK, k0, mask.k_len, D, tid);
  practical_stage<T, BK, DV4, NT>(
      v_tile, v, v_base, 0, v_st[2], v_st[3], 1, BK, k0, mask.k_len, DV, tid);
  for (int t = tid; t < BK; t += NT) {
    k_id_tile[t] = practical_key_id(mask, k_segments, ks_st, batch, k0 + t);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int key = k0 + j;
  const int k_id = k_id_tile[j];
  float s[RL];
  float dp[RL];
  practical_dots<T, RL, D4>(s, q_tile + (sg * R + lr) * D4, LR * D4, k_tile + j * D4);
  practical_dots<T, RL, DV4>(dp, do_tile + (sg * R + lr) * DV4, LR * DV4, v_tile + j * DV4);
  for (int u = 0; u < RL; ++u) {
    bool keep;
    const float x = practical_masked_score(
        mask, rows[u], key, k_id, mask_array, array_strides.key, s[u] * scale, keep);
    // A dropped score is a constant: no weight, no gradient.
    const float p = keep ? flash_exp(x - row_lse[u]) : 0.0f;
    ds_tile[(sg * R + lr + LR * u) * BK + j] = p * (dp[u] - row_delta[u]);
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);

  practical_accumulate<T, R, BK, DT, D4>(dq_acc, ds_tile + sg * R * BK, k_tile, lane, D);
}

for (int r = 0; r < R; ++r) {
  const int f = sg * R + r;
  const int pos = tile.pos_begin + f / tile.heads;
  if (f < tile.rows_used && pos < mask.q_len) {
    const int head = tile.first_head + f % tile.heads;
    const int64_t out_row = ((int64_t(batch) * mask.n_q_heads + head) * tile.piece.count + pos - tile.piece.begin) * D;
    for (int t = 0; t < DT; ++t) {
      const int d = lane + 32 * t;
      if (d < D) {
        dq[out_row + d] = static_cast<T>(scale * dq_acc[r][t]);
      }
    }
  }
}
