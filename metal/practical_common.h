// Helpers of the practical kernels (after flash_common.h).
//
// Tiles live in threadgroup memory in the input dtype T, as 4-vectors: a row
// of n elements takes ceil(n / 4) vectors, plus one vector of padding where
// different lanes read different rows at the same column (so that 32 rows
// read at once start in different banks). Elements past n are zeros, so
// dot products over whole vectors need no bounds. Reads convert to float32;
// all arithmetic is float32.
//
// Two lane layouts, see practical.py:
//   * the score phase: a simdgroup's 32 lanes are LANE_ROWS x N (N = 32 / LANE_ROWS),
//     lane (r, n) owns item n of the tile (a key, or a query row) and every
//     LANE_ROWS-th of the simdgroup's rows (or keys) from r on, so each
//     score is computed by exactly one lane;
//   * the accumulation phase: lane l owns output columns l, l + 32, ...

// Maximum / sum over the N consecutive lanes that share a lane-row (N is 8,
// 16 or 32): one simd_max / simd_sum for N = 32, else a butterfly of
// log2(N) shuffles that stays inside each block of N lanes.
template <int N, typename V>
inline V practical_group_max(V x) {
  if (N == 32) {
    return simd_max(x);
  }
  for (ushort o = N / 2; o > 0; o /= 2) {
    x = max(x, simd_shuffle_xor(x, o));
  }
  return x;
}

template <int N, typename V>
inline V practical_group_sum(V x) {
  if (N == 32) {
    return simd_sum(x);
  }
  for (ushort o = N / 2; o > 0; o /= 2) {
    x += simd_shuffle_xor(x, o);
  }
  return x;
}

// Four elements [col, col + 4) of a device row, zeros past n_cols.
template <typename T, typename P>
inline vec<T, 4> practical_load4(P src, int64_t row_base, int64_t col_stride, int col, int n_cols) {
  vec<T, 4> out = vec<T, 4>(T(0));
  for (int c = 0; c < 4; ++c) {
    if (col + c < n_cols) {
      out[c] = src[row_base + (col + c) * col_stride];
    }
  }
  return out;
}

// Stages ROWS rows of COLS4 vectors into `tile` with all NT threads. Tile
// row f holds head `f % heads` (heads = 1: one head) at position
// `first + f / heads` of `src`; rows at or past `rows_used`, or whose
// position is at or past `end`, and columns past n_cols are zeros.
template <typename T, int ROWS, int COLS4, int NT, typename P>
inline void practical_stage(
    threadgroup vec<T, 4>* tile,
    P src,
    int64_t base,
    int64_t head_stride,
    int64_t row_stride,
    int64_t col_stride,
    int heads,
    int rows_used,
    int first,
    int end,
    int n_cols,
    int tid) {
  for (int i = tid; i < ROWS * COLS4; i += NT) {
    const int f = i / COLS4;
    const int col = (i % COLS4) * 4;
    const int row = first + f / heads;
    vec<T, 4> value = vec<T, 4>(T(0));
    if (f < rows_used && row < end) {
      const int64_t row_base = base + (f % heads) * head_stride + row * row_stride;
      value = practical_load4<T>(src, row_base, col_stride, col, n_cols);
    }
    tile[i] = value;
  }
}

// out[u] = <a row u, b>: dot products over N4 vectors of ROWS rows of a
// tile (row u at a + u * a_step vectors) against one row b, loading each
// vector of b once for all ROWS.
template <typename T, int ROWS, int N4>
inline void practical_dots(
    thread float* out,
    const threadgroup vec<T, 4>* a,
    int a_step,
    const threadgroup vec<T, 4>* b) {
  for (int u = 0; u < ROWS; ++u) {
    out[u] = 0.0f;
  }
  for (int c = 0; c < N4; ++c) {
    const float4 bv = float4(b[c]);
    for (int u = 0; u < ROWS; ++u) {
      out[u] += dot(float4(a[u * a_step + c]), bv);
    }
  }
}

// acc[r][t] += sum_n w[r * N + n] * x[n][lane + 32 t] for the ROWS rows of
// a simdgroup: w is a (ROWS, N) float32 tile of weights (P or dS, read four
// at a time, the same address in every lane), x a tile of N rows of X4
// vectors whose first n_cols columns are the lanes' output columns.
template <typename T, int ROWS, int N, int TPL, int X4>
inline void practical_accumulate(
    thread float (&acc)[ROWS][TPL],
    const threadgroup float* w,
    const threadgroup vec<T, 4>* x,
    int lane,
    int n_cols) {
  // Each lane's columns, clamped: a column past n_cols is computed from a
  // valid element and never written.
  int at[TPL];
  for (int t = 0; t < TPL; ++t) {
    at[t] = min(lane + 32 * t, n_cols - 1);
  }
  for (int n = 0; n < N; n += 4) {
    float xs[4][TPL];
    for (int m = 0; m < 4; ++m) {
      for (int t = 0; t < TPL; ++t) {
        xs[m][t] = float(x[(n + m) * X4 + at[t] / 4][at[t] % 4]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const float4 wv = float4(w[r * N + n], w[r * N + n + 1], w[r * N + n + 2], w[r * N + n + 3]);
      for (int t = 0; t < TPL; ++t) {
        acc[r][t] += wv.x * xs[0][t] + wv.y * xs[1][t] + wv.z * xs[2][t] + wv.w * xs[3][t];
      }
    }
  }
}

// The query tile of a forward or dQ threadgroup: `heads` query heads of one
// KV head side by side (heads = Hq / threadgroups_per_grid.y, a divisor of
// the GQA group), `positions` = rows / heads query positions each. Tile row
// f is head first_head + f % heads at position pos_begin + f / heads; rows
// at or past rows_used are padding.
struct PracticalQueryTile {
  int heads;
  int first_head;
  int kv_head;
  int rows_used;
  int pos_begin;
  int pos_end; // exclusive, at most q_len
  FlashPiece piece; // the query positions this launch writes
};

inline PracticalQueryTile practical_query_tile(FlashMask mask, uint3 tg, uint3 n_tg, int rows) {
  PracticalQueryTile tile;
  tile.heads = mask.n_q_heads / int(n_tg.y);
  tile.first_head = int(tg.y) * tile.heads;
  tile.kv_head = tile.first_head / (mask.n_q_heads / mask.n_kv_heads);
  const int positions = rows / tile.heads;
  tile.rows_used = tile.heads * positions;
  tile.pos_begin = (mask.first_tile + int(tg.x)) * positions;
  tile.piece = flash_piece(mask, positions, n_tg.x, mask.q_len);
  tile.pos_end = min(tile.pos_begin + positions, mask.q_len);
  return tile;
}

// Strides of mask_array's axes, broadcast (size-1) axes 0.
struct PracticalArrayStrides {
  int64_t batch;
  int64_t head;
  int64_t row;
  int64_t key;
};

template <typename SH, typename ST>
inline PracticalArrayStrides practical_array_strides(SH shape, ST strides) {
  PracticalArrayStrides s;
  s.batch = flash_axis_stride(shape[0], strides[0]);
  s.head = flash_axis_stride(shape[1], strides[1]);
  s.row = flash_axis_stride(shape[2], strides[2]);
  s.key = flash_axis_stride(shape[3], strides[3]);
  return s;
}

// One query row's part of the mask: the keys its position rules keep,
// [key_lo, key_hi) (empty for a padding row), its document id (-1 for
// padding and for padding rows: equal to no key's practical_key_id) and
// where its row of mask_array starts.
struct PracticalRow {
  int key_lo;
  int key_hi;
  int q_id;
  int64_t array_base;
};

// Query `pos`'s document id as PracticalRow::q_id holds it: -1 for padding,
// for a row past the end (valid false) and without segments.
template <typename P, typename S>
inline int practical_query_id(FlashMask mask, P q_segments, S q_segments_strides, int batch, int pos, bool valid) {
  if (!valid || !mask.segments) {
    return -1;
  }
  return max(q_segments[batch * q_segments_strides[0] + pos * q_segments_strides[1]], -1);
}

inline PracticalRow practical_row_of(
    FlashMask mask, PracticalArrayStrides array, int q_id, int batch, int head, int pos, bool valid) {
  PracticalRow row;
  row.key_lo = valid ? flash_key_begin(mask, pos) : 0;
  row.key_hi = valid ? flash_key_end(mask, pos + 1) : 0;
  row.q_id = q_id;
  row.array_base = batch * array.batch + head * array.head + pos * array.row;
  return row;
}

template <typename P, typename S>
inline PracticalRow practical_row(
    FlashMask mask, PracticalArrayStrides array, P q_segments, S q_segments_strides,
    int batch, int head, int pos, bool valid) {
  return practical_row_of(
      mask, array, practical_query_id(mask, q_segments, q_segments_strides, batch, pos, valid),
      batch, head, pos, valid);
}

// A key's document id for the comparison with PracticalRow::q_id: -2 for
// padding and for keys past the end, so that it equals no query's id (a
// query's is >= -1). With it, flash_segments_keep is one compare.
template <typename P, typename S>
inline int practical_key_id(FlashMask mask, P k_segments, S k_segments_strides, int batch, int key) {
  if (!mask.segments || key >= mask.k_len) {
    return -2;
  }
  const int id = k_segments[batch * k_segments_strides[0] + key * k_segments_strides[1]];
  return id >= 0 ? id : -2;
}

// The masked score of (row, key): `scaled` (scale * q . k) plus an additive
// array, or -inf where the mask drops it; `keep` says which.
template <typename M>
inline float practical_masked_score(
    FlashMask mask, PracticalRow row, int key, int k_id, M mask_array, int64_t key_stride,
    float scaled, thread bool& keep) {
  keep = key >= row.key_lo && key < row.key_hi;
  if (mask.segments) {
    keep = keep && row.q_id == k_id;
  }
  if (mask.array_kind == FLASH_ARRAY_BOOL) {
    keep = keep && float(mask_array[row.array_base + key * key_stride]) != 0.0f;
  } else if (mask.array_kind == FLASH_ARRAY_ADD && keep) {
    scaled += float(mask_array[row.array_base + key * key_stride]);
  }
  return keep ? scaled : -INFINITY;
}
