/* Crop-aware JPEG decode + antialiased resize + flip, for RandomResizedCrop on FFCV JPEGs.
 *
 * Decode with libjpeg(-turbo) at DCT scale 1/denom (1, 2, 4 or 8), only the crop's rows and
 * (iMCU-aligned) columns: rows below the crop are never entropy-decoded, rows above it are
 * entropy-decoded but skip IDCT, upsampling and colour conversion (jpeg_skip_scanlines), columns
 * outside it skip them too (jpeg_crop_scanline). Then resample the (fractional) crop box to the output
 * size with a separable area filter (OpenCV's INTER_AREA, as ffcv's stock decoder), vertical pass first (contiguous rows, vectorises), mirroring columns when asked.
 *
 * fastssl_decode_crop_resize(src, size, y, x, h, w, denom, dst, out_h, out_w, flip): the source box
 * (y, x, h, w) in full-scale pixels -> dst (out_h, out_w, 3) uint8. Returns 0, or -1 on a corrupt JPEG
 * or a box outside the image (dst is then left as it was).
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <jpeglib.h>

struct fail { struct jpeg_error_mgr mgr; jmp_buf jump; };

static void on_error(j_common_ptr cinfo) { longjmp(((struct fail *)cinfo->err)->jump, 1); }
static void on_message(j_common_ptr cinfo) { (void)cinfo; }  /* warnings: stay silent */

/* One decompressor per thread, reused: creating one per image costs more than small decodes. */
static __thread struct jpeg_decompress_struct cinfo;
static __thread struct fail err;
static __thread int ready = 0;

/* Grow-only per-thread scratch buffers. */
static void *scratch(void **buf, size_t *cap, size_t need) {
    if (need > *cap) {
        free(*buf);
        *buf = malloc(need);
        *cap = *buf ? need : 0;
    }
    return *buf;
}

static __thread void *pix_buf = NULL, *row_buf = NULL, *wt_buf = NULL;
static __thread size_t pix_cap = 0, row_cap = 0, wt_cap = 0;

/* Decode the box at scale 1/denom into pix_buf; geom = (first row, first column, rows, columns) of
 * the scaled image that pix_buf holds (a box containing the scaled crop). */
static int crop_decode(const uint8_t *src, uint64_t size, uint32_t y, uint32_t x, uint32_t h, uint32_t w,
                       uint32_t denom, int32_t *geom) {
    if (!ready) {
        cinfo.err = jpeg_std_error(&err.mgr);
        err.mgr.error_exit = on_error;
        err.mgr.output_message = on_message;
        jpeg_create_decompress(&cinfo);
        ready = 1;
    }
    if (setjmp(err.jump)) {
        jpeg_abort_decompress(&cinfo);
        return -1;
    }
    jpeg_mem_src(&cinfo, src, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;  /* what ffcv's decoder uses (TJFLAG_FASTDCT) */
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    JDIMENSION out_w = cinfo.output_width, out_h = cinfo.output_height;
    JDIMENSION x0 = x / denom, x1 = (x + w + denom - 1) / denom;
    JDIMENSION y0 = y / denom, y1 = (y + h + denom - 1) / denom;
    if (x1 > out_w) x1 = out_w;
    if (y1 > out_h) y1 = out_h;
    if (x0 >= x1 || y0 >= y1) { jpeg_abort_decompress(&cinfo); return -1; }
    JDIMENSION xoff = x0, width = x1 - x0;
    if (width < out_w) jpeg_crop_scanline(&cinfo, &xoff, &width);  /* widens to iMCU bounds */
    JDIMENSION rows = y1 - y0;
    size_t stride = (size_t)width * 3;
    uint8_t *dst = scratch(&pix_buf, &pix_cap, stride * rows);
    if (!dst) { jpeg_abort_decompress(&cinfo); return -1; }
    if (y0 > 0) jpeg_skip_scanlines(&cinfo, y0);
    JDIMENSION got = 0;
    while (got < rows) {
        JSAMPROW row = dst + (size_t)got * stride;
        JDIMENSION n = jpeg_read_scanlines(&cinfo, &row, 1);
        if (n == 0) { jpeg_abort_decompress(&cinfo); return -1; }
        got += n;
    }
    jpeg_abort_decompress(&cinfo);  /* the rows below the crop are never decoded */
    geom[0] = (int32_t)y0; geom[1] = (int32_t)xoff; geom[2] = (int32_t)rows; geom[3] = (int32_t)width;
    return 0;
}

/* Resampling taps for out_size samples of the input interval [lo, hi) (input has in_size samples):
 * first[i], count[i] and weights w[i * ksize ...] summing to 1. Downscaling averages each output
 * pixel's footprint (area filter: the weight of an input pixel is its overlap with the footprint, as
 * OpenCV's INTER_AREA, which ffcv's stock decoder uses); upscaling interpolates linearly. */
static int taps(double lo, double hi, int in_size, int out_size, int *first, int *count, float *w) {
    double scale = (hi - lo) / out_size;
    int ksize = (int)ceil(scale) + 2;
    for (int i = 0; i < out_size; i++) {
        float *wi = w + (size_t)i * ksize;
        int a, n = 0;
        if (scale >= 1.0) {
            double f0 = lo + i * scale, f1 = f0 + scale;
            a = (int)floor(f0);
            for (int k = a; k < f1 && n < ksize; k++, n++)
                wi[n] = (float)((fmin(f1, k + 1.0) - fmax(f0, (double)k)) / scale);
        } else {
            double c = lo + (i + 0.5) * scale - 0.5;
            a = (int)floor(c);
            float t = (float)(c - a);
            wi[0] = 1.0f - t; wi[1] = t; n = 2;
        }
        /* clamp to the decoded pixels, folding weight that falls outside onto the edge */
        while (a < 0) { wi[1] += wi[0]; for (int k = 1; k < n; k++) wi[k - 1] = wi[k]; a++; n--; }
        while (a + n > in_size && n > 1) { wi[n - 2] += wi[n - 1]; n--; }
        if (a >= in_size) { a = in_size - 1; n = 1; wi[0] = 1.0f; }
        first[i] = a; count[i] = n;
    }
    return ksize;
}

static inline uint8_t clip8(float v) { return v <= 0.0f ? 0 : v >= 255.0f ? 255 : (uint8_t)(v + 0.5f); }

int fastssl_decode_crop_resize(const uint8_t *src, uint64_t size, uint32_t y, uint32_t x, uint32_t h,
                               uint32_t w, uint32_t denom, uint8_t *dst, uint32_t out_h, uint32_t out_w,
                               uint32_t flip) {
    int32_t g[4];
    if (crop_decode(src, size, y, x, h, w, denom, g) != 0) return -1;
    const uint8_t *pix = pix_buf;
    int rows = g[2], cols = g[3];
    double y_lo = (double)y / denom - g[0], y_hi = (double)(y + h) / denom - g[0];
    double x_lo = (double)x / denom - g[1], x_hi = (double)(x + w) / denom - g[1];
    int ky = (int)ceil((y_hi - y_lo) / out_h) + 2, kx = (int)ceil((x_hi - x_lo) / out_w) + 2;
    size_t wt_need = sizeof(float) * ((size_t)out_h * ky + (size_t)out_w * kx) + sizeof(int) * 2 * (out_h + out_w);
    size_t row_need = sizeof(float) * (size_t)cols * 3;
    if (!scratch(&wt_buf, &wt_cap, wt_need) || !scratch(&row_buf, &row_cap, row_need)) return -1;
    float *wy = wt_buf, *wx = wy + (size_t)out_h * ky;
    int *fy = (int *)(wx + (size_t)out_w * kx), *ny = fy + out_h, *fx = ny + out_h, *nx = fx + out_w;
    taps(y_lo, y_hi, rows, out_h, fy, ny, wy);
    taps(x_lo, x_hi, cols, out_w, fx, nx, wx);
    float *acc = row_buf;
    size_t stride = (size_t)cols * 3;
    for (uint32_t i = 0; i < out_h; i++) {
        /* vertical: one output row of the decoded width */
        const float *wi = wy + (size_t)i * ky;
        const uint8_t *r0 = pix + (size_t)fy[i] * stride;
        for (size_t c = 0; c < stride; c++) acc[c] = wi[0] * r0[c];
        for (int k = 1; k < ny[i]; k++) {
            const uint8_t *r = r0 + (size_t)k * stride;
            float wk = wi[k];
            for (size_t c = 0; c < stride; c++) acc[c] += wk * r[c];
        }
        /* horizontal, mirrored if flipping */
        uint8_t *out = dst + (size_t)i * out_w * 3;
        for (uint32_t j = 0; j < out_w; j++) {
            const float *wj = wx + (size_t)j * kx;
            const float *a = acc + (size_t)fx[j] * 3;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
            for (int k = 0; k < nx[j]; k++) {
                s0 += wj[k] * a[3 * k];
                s1 += wj[k] * a[3 * k + 1];
                s2 += wj[k] * a[3 * k + 2];
            }
            uint8_t *o = out + 3 * (size_t)(flip ? out_w - 1 - j : j);
            o[0] = clip8(s0); o[1] = clip8(s1); o[2] = clip8(s2);
        }
    }
    return 0;
}
