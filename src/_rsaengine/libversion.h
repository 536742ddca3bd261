/*
 * The TLS library this extension is compiled against, for the check at
 * import (pyprivsep/native.py) that the library loaded at run time is the
 * same one.  build_ffi.py declares these names in the cdef ("..."), so
 * cffi takes their values from here, at compile time; the loaded
 * library's own answer is OpenSSL_version_num() and pps_library_version().
 * LibreSSL's OpenSSL_version_num() is a fixed 0x20000000, so for it the
 * check compares LIBRESSL_VERSION_NUMBER with the loaded version's text.
 */
#ifndef PPS_LIBVERSION_H
#define PPS_LIBVERSION_H

#include <openssl/opensslv.h>

#define PPS_BUILT_OPENSSL	OPENSSL_VERSION_NUMBER
#ifdef LIBRESSL_VERSION_NUMBER
#define PPS_BUILT_LIBRESSL	LIBRESSL_VERSION_NUMBER	/* 0xMNNFF00fL */
#define PPS_BUILT_TEXT		LIBRESSL_VERSION_TEXT
#else
#define PPS_BUILT_LIBRESSL	0			/* not LibreSSL */
#define PPS_BUILT_TEXT		OPENSSL_VERSION_TEXT
#endif

#endif
