// A driver of the native kernel for a cross-compiled (aarch64) build run under emulation: compiled together with
// library.source() (the generated prelude and sm3_native.cpp), it reads the blocks and hyperparameters a test
// wrote, runs sm3_native_step once, and writes the parameters, momentum and maxima back, all as raw bytes.
// Input: int64 nblocks, int64 flags, NHYPER doubles; per block int64 rows, cols, pdtype, mkind, then w, g, m
// (absent with MOMENTUM_NONE), rowmin (rows floats), colacc (cols floats). Output: per block w, m, rowmax, colmax.
// argv: input path, output path. Prints "<isa> <vector width>" on stdout.
#include <cstdio>
#include <cstdlib>

static size_t esize(int64_t kind_is_bf16) { return kind_is_bf16 ? 2 : 4; }

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 3;
  int64_t nblocks = 0, flags = 0;
  double hyper[NHYPER];
  if (std::fread(&nblocks, 8, 1, in) != 1 || std::fread(&flags, 8, 1, in) != 1 ||
      std::fread(hyper, 8, NHYPER, in) != size_t(NHYPER))
    return 4;
  std::vector<int64_t> meta(size_t(nblocks) * NFIELDS, 0);
  std::vector<std::vector<char>> w(nblocks), g(nblocks), m(nblocks);
  std::vector<std::vector<float>> rowmin(nblocks), colacc(nblocks), rowmax(nblocks), colmax(nblocks);
  for (int64_t k = 0; k < nblocks; ++k) {
    int64_t head[4];
    if (std::fread(head, 8, 4, in) != 4) return 5;
    const int64_t rows = head[0], cols = head[1], pdtype = head[2], mkind = head[3], n = rows * cols;
    auto read = [&](std::vector<char>& v, size_t bytes) { v.resize(bytes); return std::fread(v.data(), 1, bytes, in) == bytes; };
    if (!read(w[k], n * esize(pdtype == DTYPE_BF16)) || !read(g[k], n * esize(pdtype == DTYPE_BF16))) return 6;
    if (mkind != MOMENTUM_NONE && !read(m[k], n * esize(mkind == MOMENTUM_BF16))) return 7;
    rowmin[k].resize(rows);
    colacc[k].resize(cols);
    rowmax[k].assign(rows, 0.0f);
    colmax[k].assign(cols, 0.0f);
    if (std::fread(rowmin[k].data(), 4, rows, in) != size_t(rows) || std::fread(colacc[k].data(), 4, cols, in) != size_t(cols))
      return 8;
    int64_t* f = meta.data() + k * NFIELDS;
    f[F_W] = int64_t(w[k].data());
    f[F_G] = int64_t(g[k].data());
    f[F_M] = mkind == MOMENTUM_NONE ? 0 : int64_t(m[k].data());
    f[F_ROWMIN] = int64_t(rowmin[k].data());
    f[F_COLACC] = int64_t(colacc[k].data());
    f[F_ROWMAX] = int64_t(rowmax[k].data());
    f[F_COLMAX] = int64_t(colmax[k].data());
    f[F_ROWS] = rows;
    f[F_COLS] = cols;
    f[F_PDTYPE] = pdtype;
    f[F_MKIND] = mkind;
    f[F_KEEP_MAX] = 1;
  }
  std::fclose(in);
  if (sm3_native_step(meta.data(), nblocks, hyper, flags, 2, 1 << 16) != 0) return 9;
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 10;
  for (int64_t k = 0; k < nblocks; ++k) {
    std::fwrite(w[k].data(), 1, w[k].size(), out);
    std::fwrite(m[k].data(), 1, m[k].size(), out);
    std::fwrite(rowmax[k].data(), 4, rowmax[k].size(), out);
    std::fwrite(colmax[k].data(), 4, colmax[k].size(), out);
  }
  std::fclose(out);
  std::printf("%s %d\n", sm3_native_isa(), sm3_native_vector_width());
  return 0;
}
