// Practical flash-attention forward: O = softmax(scale * Q K^T + mask) V and
// the per-row log-sum-exp, one pass over the keys a query tile can see.
//
// Inputs and the mask rule: flash_common.h. Outputs: o (B, Hq, Lq, DV) in T,
// lse (B, Hq, Lq) float32 (natural log; +inf for a row that keeps no key).
// Grid: threadgroups (ceil(Lq / positions), Hq / heads, B) of NSG * 32
// threads (PracticalQueryTile: heads query heads of one KV head, positions
// = BQ / heads query positions).
//
// Template constants: T, D, DV, NSG (simdgroups), R (query rows per
// simdgroup), BK (keys per tile: 32, 16 or 8).
//
// The query tile is BQ = NSG * R rows, the heads of a GQA group side by
// side, so they share each staged K/V tile; simdgroup s owns rows
// [s R, s R + R). Per key tile of BK keys:
//   1. scores: lane (r, j) of the simdgroup's LR x BK lanes computes the
//      score of key j against rows r, r + LR, ... (RL = R / LR of them), a
//      full dot product over the Q and K tiles: each score once, by one
//      lane, which masks it;
//   2. online softmax with a lazy maximum: m only has to bound the row's
//      scores to within PRACTICAL_SLACK (p = exp(s - m) <= e^SLACK cannot
//      overflow), so the row maximum and the correction exp(m - m') are
//      taken only when some score of the simdgroup's tile passes its row's
//      m + SLACK (one simd_any per lane and tile; after the first tiles of
//      a row almost never). Then p = exp(s - m) per score; l is kept per
//      lane (each lane its keys' part) and summed once at the end;
//   3. O: lane l owns output columns l, l + 32, ...: O = O * correction + P V
//      with P read from threadgroup memory, the rescale only after a new m.

constexpr int NT = NSG * 32;
constexpr int BQ = NSG * R;
constexpr int LR = 32 / BK; // lane-rows in the score phase
constexpr int RL = R / LR; // rows per lane in the score phase
constexpr int D4 = (D + 3) / 4 + 1; // Q and K tile rows, in vectors, padded
constexpr int DV4 = (DV + 3) / 4; // V tile rows (read along columns)
constexpr int DVT = (DV + 31) / 32; // output columns per lane
// How far a score may exceed its row's running maximum m before m moves
// (natural units): p <= e^8 ~ 3000, and l <= k_len * 3000 stays far from
// float32's range. The result does not depend on it: lse = m + log(l).
constexpr float PRACTICAL_SLACK = 8.0f;

threadgroup vec<T, 4> q_tile[BQ * D4];
threadgroup vec<T, 4> k_tile[BK * D4];
threadgroup vec<T, 4> v_tile[BK * DV4];
threadgroup float p_tile[BQ * BK];
threadgroup float row_scale[BQ];
threadgroup int k_id_tile[BK]; // the key tile's document ids (practical_key_id)

const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
// Metadata, read once into registers (flash_common.h, uniform reads).
const FlashMask mask = flash_read_mask(params, ushort(lane));
const FlashDims<4> q_st = flash_dims<4>(q_strides, ushort(lane));
const FlashDims<4> k_st = flash_dims<4>(k_strides, ushort(lane));
const FlashDims<4> v_st = flash_dims<4>(v_strides, ushort(lane));
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

// Score-phase rows of this lane: simdgroup row lr + LR * u.
const int lr = lane / BK;
const int j = lane % BK;
PracticalRow rows[RL];
// Running maximum, natural units, kept lazily: every score seen so far is
// at most m + PRACTICAL_SLACK. It starts at -FLT_MAX rather than -inf:
// every later maximum is then finite, so exp(x - m) and the correction need
// no -inf guard (flash_exp_base), and while nothing is kept l and O are 0
// whatever the correction is. A kept row whose scores are all -inf still
// ends with l = 0 (NaN) and lse = -FLT_MAX + log(0) = -inf.
float m[RL];
float limit[RL]; // m + PRACTICAL_SLACK: a score above it moves m
float l[RL]; // this lane's part of the running sum
bool kept[RL]; // whether this lane kept any score of the row
for (int u = 0; u < RL; ++u) {
  const int f = sg * R + lr + LR * u;
  const int pos = tile.pos_begin + f / tile.heads;
  const int head = tile.first_head + f % tile.heads;
  const bool valid = f < tile.rows_used && pos < mask.q_len;
  rows[u] = practical_row(
      mask, array_strides, q_segments, qs_st, batch, head, pos, valid);
  // A sink starts the row: m = sink, l = 1 (held by the lane-row's lane 0).
  // A sink of -inf adds nothing: the row starts as without one (m = -inf
  // would make exp(s - m) NaN for the -inf scores of an additive mask).
  const float sink = valid && mask.sinks ? float(sinks[head]) : -INFINITY;
  m[u] = sink == -INFINITY ? -FLT_MAX : sink;
  limit[u] = m[u] + PRACTICAL_SLACK;
  l[u] = (sink != -INFINITY && j == 0) ? 1.0f : 0.0f;
  kept[u] = false;
}

float o_acc[R][DVT];
for (int r = 0; r < R; ++r) {
  for (int t = 0; t < DVT; ++t) {
    o_acc[r][t] = 0.0f;
  }
}

// Key tiles that the causal and window rules leave to some row of the tile.
const int key_begin = flash_key_begin(mask, tile.pos_begin);
const int key_end = flash_key_end(mask, tile.pos_end);
const int2 q_range = mask.segments
    ? flash_tile_range(q_ranges, qr_st, batch, mask.first_tile + int(threadgroup_position_in_grid.x), ushort(lane))
    : int2(0, 0);
const int64_t k_base = batch * k_st[0] + tile.kv_head * k_st[1];
const int64_t v_base = batch * v_st[0] + tile.kv_head * v_st[1];

// Walked from the last key tile down. With segment ids the walk ends where
// no tile below holds an id of this query tile, and documents that cannot
// meet are skipped before anything is staged (the ranges are the same for
// every thread, so no barrier is split).
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
  // Every simdgroup is done with the previous tile before it is overwritten.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  practical_stage<T, BK, D4, NT>(
      k_tile, k, k_base, 0, k_st[2], k_st[3], 1, BK, k0, mask.k_len, D, tid);
  practical_stage<T, BK, DV4, NT>(
      v_tile, v, v_base, 0, v_st[2], v_st[3], 1, BK, k0, mask.k_len, DV, tid);
  for (int t = tid; t < BK; t += NT) {
    k_id_tile[t] = practical_key_id(mask, k_segments, ks_st, batch, k0 + t);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 1-2. Scores of key j, masked; online softmax of each row.
  const int key = k0 + j;
  const int k_id = k_id_tile[j];
  float s[RL];
  practical_dots<T, RL, D4>(s, q_tile + (sg * R + lr) * D4, LR * D4, k_tile + j * D4);
  bool passes = false;
  for (int u = 0; u < RL; ++u) {
    bool keep;
    s[u] = practical_masked_score(
        mask, rows[u], key, k_id, mask_array, array_strides.key, s[u] * scale, keep);
    kept[u] = kept[u] || keep;
    passes = passes || s[u] > limit[u];
  }
  // The same answer in every lane of the simdgroup: a uniform branch.
  const bool rescale = simd_any(passes);
  if (rescale) {
    for (int u = 0; u < RL; ++u) {
      const float m_new = max(m[u], practical_group_max<BK>(s[u]));
      const float correction = flash_exp(m[u] - m_new);
      l[u] *= correction;
      m[u] = m_new;
      limit[u] = m_new + PRACTICAL_SLACK;
      if (j == 0) {
        row_scale[sg * R + lr + LR * u] = correction;
      }
    }
  }
  for (int u = 0; u < RL; ++u) {
    const float p = flash_exp(s[u] - m[u]);
    l[u] += p;
    p_tile[(sg * R + lr + LR * u) * BK + j] = p;
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);

  // 3. O = O * correction + P V, lanes over output columns. Only after a
  // new maximum, and only rows whose correction is not exactly 1 (the same
  // value in every lane: a uniform branch).
  if (rescale) {
    for (int r = 0; r < R; ++r) {
      const float correction = row_scale[sg * R + r];
      if (correction != 1.0f) {
        for (int t = 0; t < DVT; ++t) {
          o_acc[r][t] *= correction;
        }
      }
    }
  }
  practical_accumulate<T, R, BK, DVT, DV4>(o_acc, p_tile + sg * R * BK, v_tile, lane, DV);
}

// Each row's sum and kept flag over its lane-row, then O / l and
// lse = m + log(l). A row whose kept scores are all -inf has l = 0 and
// gives NaN, as in MLX; a row that kept nothing gives zeros and +inf.
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int u = 0; u < RL; ++u) {
  const float row_sum = practical_group_sum<BK>(l[u]);
  const bool row_kept = practical_group_max<BK>(kept[u] ? 1 : 0) != 0;
  const int f = sg * R + lr + LR * u;
  const int pos = tile.pos_begin + f / tile.heads;
  if (j == 0) {
    // -inf (never 1 / l, which is >= 0 or NaN) marks a row that kept nothing.
    row_scale[f] = row_kept ? 1.0f / row_sum : -INFINITY;
    if (f < tile.rows_used && pos < mask.q_len) {
      const int head = tile.first_head + f % tile.heads;
      lse[(int64_t(batch) * mask.n_q_heads + head) * tile.piece.count + pos - tile.piece.begin] =
          row_kept ? m[u] + log(row_sum) : INFINITY;
    }
  }
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int r = 0; r < R; ++r) {
  const int f = sg * R + r;
  const int pos = tile.pos_begin + f / tile.heads;
  if (f < tile.rows_used && pos < mask.q_len) {
    const int head = tile.first_head + f % tile.heads;
    const float inv_sum = row_scale[f];
    const int64_t out_row = ((int64_t(batch) * mask.n_q_heads + head) * tile.piece.count + pos - tile.piece.begin) * DV;
    for (int t = 0; t < DVT; ++t) {
      const int d = lane + 32 * t;
      if (d < DV) {
        o[out_row + d] = static_cast<T>(inv_sum == -INFINITY ? 0.0f : o_acc[r][t] * inv_sum);
      }
    }
  }
}
