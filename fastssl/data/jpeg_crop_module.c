/* The Python module around jpeg_crop.c, so that the decoder installs, and is found, as the extension
 * fastssl.data._jpeg_crop (as ffcv's _libffcv). It defines no Python functions: fastssl.data.jpeg_crop
 * loads this file with ctypes and numba code calls fastssl_decode_crop_resize directly. */
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_crop",
                                    "The crop-aware JPEG decoder's C functions (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__jpeg_crop(void) { return PyModule_Create(&module); }
