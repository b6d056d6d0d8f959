// Practical flash-attention forward: O = softmax(scale * Q K^T + mask) V and
// the per-row log-sum-exp, one pass over the keys a query tile can see.
//
// Inputs and the mask rule: flash_common.h. Outputs: o (B, Hq, Lq, DV) in T,
// lse (B, Hq, Lq) float32 (natural log; +inf for a row that keeps no key).
// Grid: threadgroups (ceil(Lq / positions), Hq / heads, B) of NSG * 32
// threads, heads = Hq / threadgroups_per_grid.y query heads of one KV head
// (a divisor of the GQA group) and positions = BQ / heads query positions.
//
// Template constants: T, D, DV, NSG (simdgroups), R (query rows per
// simdgroup), BK (keys per tile: 32, 16 or 8).
//
// A query tile is BQ = NSG * R rows: row f is head f % heads at position
// first + f / heads, so the heads of a GQA group share each staged K/V tile.
// Simdgroup s owns rows [s R, s R + R). Per key tile of BK keys:
//   1. scores: lane (r, j) of the simdgroup's LR x BK lanes computes the
//      score of key j against rows r, r + LR, ... (RL = R / LR of them), a
//      full dot product over the Q and K tiles: each score once, by one
//      lane; it masks it and takes the row's tile maximum (one group max);
//   2. online softmax, per score: p = exp(s - m'), and per row the
//      correction exp(m - m'); l is kept per lane (each lane its keys' part)
//      and summed once at the end;
//   3. O: lane l owns output columns l, l + 32, ...: O = O * correction + P V
//      with P read from threadgroup memory.

constexpr int NT = NSG * 32;
constexpr int BQ = NSG * R;
constexpr int LR = 32 / BK; // lane-rows in the score phase
constexpr int RL = R / LR; // rows per lane in the score phase
constexpr int D4 = (D + 3) / 4 + 1; // Q and K tile rows, in vectors, padded
constexpr int DV4 = (DV + 3) / 4; // V tile rows (read along columns)
constexpr int DVT = (DV + 31) / 32; // output columns per lane

threadgroup vec<T, 4> q_tile[BQ * D4];
threadgroup vec<T, 4> k_tile[BK * D4];
threadgroup vec<T, 4> v_tile[BK * DV4];
threadgroup float p_tile[BQ * BK];
threadgroup float row_scale[BQ];

const FlashMask mask = flash_read_mask(params);
const float scale = fparams[0];

const int tid = thread_index_in_threadgroup;
const int lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int batch = threadgroup_position_in_grid.z;
const int heads = mask.n_q_heads / int(threadgroups_per_grid.y);
const int first_head = threadgroup_position_in_grid.y * heads;
const int kv_head = first_head / (mask.n_q_heads / mask.n_kv_heads);
const int positions = BQ / heads;
const int rows_used = heads * positions;
const int pos_begin = threadgroup_position_in_grid.x * positions;
const int pos_end = min(pos_begin + positions, mask.q_len);

const int64_t m_batch = batch * flash_axis_stride(mask_array_shape[0], mask_array_strides[0]);
const int64_t m_head = flash_axis_stride(mask_array_shape[1], mask_array_strides[1]);
const int64_t m_row = flash_axis_stride(mask_array_shape[2], mask_array_strides[2]);
const int64_t m_key = flash_axis_stride(mask_array_shape[3], mask_array_strides[3]);

practical_stage<T, BQ, D4, NT>(
    q_tile, q, batch * q_strides[0] + first_head * q_strides[1], q_strides[1],
    q_strides[2], q_strides[3], heads, rows_used, pos_begin, mask.q_len, D, tid);

// Score-phase rows of this lane: simdgroup row lr + LR * u.
const int lr = lane / BK;
const int j = lane % BK;
int key_lo[RL]; // the row's keys by the position rules: [key_lo, key_hi)
int key_hi[RL];
int q_id[RL]; // -1 for padding and for rows past the tile
int64_t m_base[RL];
// Running maximum, natural units. It starts at -FLT_MAX rather than -inf:
// every later maximum is then finite, so exp(x - m) and the correction need
// no -inf guard (flash_exp_base), and while nothing is kept l and O are 0
// whatever the correction is. A kept row whose scores are all -inf still
// ends with l = 0 (NaN) and lse = -FLT_MAX + log(0) = -inf.
float m[RL];
float l[RL]; // this lane's part of the running sum
bool kept[RL]; // whether this lane kept any score of the row
for (int u = 0; u < RL; ++u) {
  const int f = sg * R + lr + LR * u;
  const int pos = pos_begin + f / heads;
  const int head = first_head + f % heads;
  const bool valid = f < rows_used && pos < mask.q_len;
  key_lo[u] = valid ? flash_key_begin(mask, pos) : 0;
  key_hi[u] = valid ? flash_key_end(mask, pos + 1) : 0;
  q_id[u] = -1;
  if (valid && mask.segments) {
    q_id[u] = max(q_segments[batch * q_segments_strides[0] + pos * q_segments_strides[1]], -1);
  }
  m_base[u] = m_batch + head * m_head + pos * m_row;
  // A sink starts the row: m = sink, l = 1 (held by the lane-row's lane 0).
  const bool sink = valid && mask.sinks;
  m[u] = sink ? sinks[head] : -FLT_MAX;
  l[u] = (sink && j == 0) ? 1.0f : 0.0f;
  kept[u] = false;
}

float o_acc[R][DVT];
for (int r = 0; r < R; ++r) {
  for (int t = 0; t < DVT; ++t) {
    o_acc[r][t] = 0.0f;
  }
}

// Key tiles that the causal and window rules leave to some row of the tile.
const int key_begin = flash_key_begin(mask, pos_begin);
const int key_end = flash_key_end(mask, pos_end);
const int2 q_range = mask.segments
    ? flash_tile_range(q_ranges, q_ranges_strides, batch, threadgroup_position_in_grid.x)
    : int2(0, 0);
const int64_t k_base = batch * k_strides[0] + kv_head * k_strides[1];
const int64_t v_base = batch * v_strides[0] + kv_head * v_strides[1];

for (int k0 = (key_begin / BK) * BK; k0 < key_end; k0 += BK) {
  // Documents that cannot meet: skipped before anything is staged (the
  // ranges are the same for every thread, so no barrier is split).
  if (mask.segments &&
      !flash_ranges_meet(q_range, flash_tile_range(k_ranges, k_ranges_strides, batch, k0 / BK))) {
    continue;
  }
  // Every simdgroup is done with the previous tile before it is overwritten.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  practical_stage<T, BK, D4, NT>(
      k_tile, k, k_base, 0, k_strides[2], k_strides[3], 1, BK, k0, mask.k_len, D, tid);
  practical_stage<T, BK, DV4, NT>(
      v_tile, v, v_base, 0, v_strides[2], v_strides[3], 1, BK, k0, mask.k_len, DV, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 1-2. Scores of key j, masked; online softmax of each row.
  const int key = k0 + j;
  int k_id = -2; // never equal to a query's id (>= -1)
  if (mask.segments && key < mask.k_len) {
    const int id = k_segments[batch * k_segments_strides[0] + key * k_segments_strides[1]];
    k_id = id >= 0 ? id : -2;
  }
  float s[RL];
  practical_dots<T, RL, D4>(s, q_tile + (sg * R + lr) * D4, LR * D4, k_tile + j * D4);
  for (int u = 0; u < RL; ++u) {
    bool keep = key >= key_lo[u] && key < key_hi[u];
    if (mask.segments) {
      keep = keep && q_id[u] == k_id;
    }
    float x = s[u] * scale;
    if (mask.array_kind == FLASH_ARRAY_BOOL) {
      keep = keep && float(mask_array[m_base[u] + key * m_key]) != 0.0f;
    } else if (mask.array_kind == FLASH_ARRAY_ADD && keep) {
      x += float(mask_array[m_base[u] + key * m_key]);
    }
    x = keep ? x : -INFINITY;
    kept[u] = kept[u] || keep;
    const float m_new = max(m[u], practical_group_max<BK>(x));
    const float p = flash_exp(x - m_new);
    const float correction = flash_exp(m[u] - m_new);
    l[u] = l[u] * correction + p;
    m[u] = m_new;
    const int row = sg * R + lr + LR * u;
    p_tile[row * BK + j] = p;
    if (j == 0) {
      row_scale[row] = correction;
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);

  // 3. O = O * correction + P V, lanes over output columns. The correction
  // is exactly 1 where the row's maximum did not change (most tiles after
  // the first few); it is the same value in every lane, so skipping the
  // rescale there is a uniform branch.
  for (int r = 0; r < R; ++r) {
    const float correction = row_scale[sg * R + r];
    if (correction != 1.0f) {
      for (int t = 0; t < DVT; ++t) {
        o_acc[r][t] *= correction;
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
  const int pos = pos_begin + f / heads;
  if (j == 0) {
    // -inf (never 1 / l, which is >= 0 or NaN) marks a row that kept nothing.
    row_scale[f] = row_kept ? 1.0f / row_sum : -INFINITY;
    if (f < rows_used && pos < mask.q_len) {
      const int head = first_head + f % heads;
      lse[(int64_t(batch) * mask.n_q_heads + head) * mask.q_len + pos] =
          row_kept ? m[u] + log(row_sum) : INFINITY;
    }
  }
}
simdgroup_barrier(mem_flags::mem_threadgroup);
for (int r = 0; r < R; ++r) {
  const int f = sg * R + r;
  const int pos = pos_begin + f / heads;
  if (f < rows_used && pos < mask.q_len) {
    const int head = first_head + f % heads;
    const float inv_sum = row_scale[f];
    const int64_t out_row = ((int64_t(batch) * mask.n_q_heads + head) * mask.q_len + pos) * DV;
    for (int t = 0; t < DVT; ++t) {
      const int d = lane + 32 * t;
      if (d < DV) {
        o[out_row + d] = static_cast<T>(inv_sum == -INFINITY ? 0.0f : o_acc[r][t] * inv_sum);
      }
    }
  }
}
