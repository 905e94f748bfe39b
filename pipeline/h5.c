/* HDF5 helpers: error translation, the archive's file-opening rules, row
 * helpers and astropy column metadata. See h5.h. */
#include "h5.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------ */

void hilal_h5_quiet(void)
{
    /* The automatic printer writes to stderr: a library never prints. */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void hilal_h5_clear(void)
{
    H5Eclear2(H5E_DEFAULT);
}

typedef struct walk_ctx {
    int count;
    char api_func[64];   /* outermost entry: the API function that failed */
    char api_desc[256];  /* its description */
    char inner_desc[512];/* innermost entry: the specific reason */
} walk_ctx;

static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    walk_ctx *ctx = data;
    if (n == 0) {
        snprintf(ctx->api_func, sizeof ctx->api_func, "%s", e->func_name ? e->func_name : "?");
        snprintf(ctx->api_desc, sizeof ctx->api_desc, "%s", e->desc ? e->desc : "");
    }
    /* Walking downward, the last entry seen is the innermost one. */
    snprintf(ctx->inner_desc, sizeof ctx->inner_desc, "%s", e->desc ? e->desc : "");
    ctx->count++;
    return 0;
}

void hilal_h5_stack_text(char *buf, size_t len)
{
    walk_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    if (len == 0)
        return;
    buf[0] = '\0';
    if (H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &ctx) < 0 || ctx.count == 0)
        return;
    if (ctx.count == 1 || strcmp(ctx.api_desc, ctx.inner_desc) == 0)
        snprintf(buf, len, "%s(): %s", ctx.api_func, ctx.api_desc);
    else
        snprintf(buf, len, "%s(): %s: %s", ctx.api_func, ctx.api_desc, ctx.inner_desc);
}

hilal_status hilal_h5_fail(hilal_error *err, hilal_status code, const char *fmt, ...)
{
    char msg[HILAL_ERROR_MSG_MAX];
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    hilal_h5_stack_text(detail, sizeof detail);
    hilal_h5_clear();
    if (detail[0] != '\0')
        return hilal_error_set(err, code, "%s (HDF5: %s)", msg, detail);
    return hilal_error_set(err, code, "%s", msg);
}

/* ------------------------------------------------------------------------
 * Files
 * ------------------------------------------------------------------------ */

#define SWMR_READ_ATTEMPTS 30

hid_t hilal_h5_fapl(int locking)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0)
        return H5I_INVALID_HID;
    /* SWMR needs the 1.10 file format (superblock v3, extensible-array
     * chunk indexes); LATEST gives exactly that with HDF5 1.10. HDF5's
     * flock() is used where the file system has it (ignored elsewhere). */
    if (H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_file_locking(fapl, locking ? 1 : 0, 1) < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

hilal_status hilal_h5_create(const char *path, hid_t *fid, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = hilal_h5_fapl(1);
    *fid = H5I_INVALID_HID;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    *fid = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (*fid < 0)
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot create HDF5 file %s; check that its directory exists and is writable", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}


/* ------------------------------------------------------------------------
 * The journaling file driver
 *
 * A POSIX file driver like HDF5's sec2 driver, except that every write of
 * metadata (any memory type but raw data) goes through a one-record redo
 * journal next to the file (<file>.journal):
 *   1. the record (offset, length, bytes, CRC-32) is written to the journal;
 *   2. the bytes are written in place;
 *   3. the record is invalidated (its 4-byte magic number is zeroed).
 * Linux can stop a write() spanning several memory pages between two pages
 * when the process gets SIGKILL, and HDF5 1.10 writes metadata blocks of
 * more than a page (extensible-array pages of chunk addresses, object
 * headers) in place; a block torn that way has a bad checksum and makes the
 * file unreadable. With the journal, a torn in-place write always has its
 * complete record, which hilal_h5_journal_replay() writes again before the
 * file is next opened for writing; a torn record is recognised by its CRC
 * and ignored (its in-place write had not started). Raw data is not
 * journaled: the archive writes raw data of committed rows only with
 * unchanged bytes (see archive.c), so tearing it cannot lose them.
 * ------------------------------------------------------------------------ */

#define JOURNAL_MAGIC 0x314a4c48u /* "HLJ1" little-endian */
#define JOURNAL_HEADER 24         /* magic u32, crc u32, offset u64, length u64 */
#define JOURNAL_MAXADDR (((haddr_t)1 << (8 * sizeof(off_t) - 1)) - 1)

/* CRC-32 (IEEE 802.3 polynomial, reflected, as zlib's crc32()). */
static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = data;
    pthread_once(&crc_once, crc_init);
    crc = ~crc;
    for (size_t i = 0; i < len; i++)
        crc = crc_table[(crc ^ p[i]) & 0xffu] ^ (crc >> 8);
    return ~crc;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Writes all of buf at off (retrying short writes and EINTR). */
static int pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

void hilal_h5_journal_path(const char *path, char *out, size_t len)
{
    snprintf(out, len, "%s.journal", path);
}

/* Writes a complete record (header and bytes) at the start of the journal. */
static int journal_put(int jfd, uint64_t offset, const void *data, size_t len)
{
    unsigned char head[JOURNAL_HEADER];
    put_u32(head, JOURNAL_MAGIC);
    put_u64(head + 8, offset);
    put_u64(head + 16, (uint64_t)len);
    /* The CRC covers offset, length and bytes. */
    uint32_t crc = crc32_update(0, head + 8, JOURNAL_HEADER - 8);
    crc = crc32_update(crc, data, len);
    put_u32(head + 4, crc);
    if (pwrite_all(jfd, data, len, JOURNAL_HEADER) != 0)
        return -1;
    return pwrite_all(jfd, head, JOURNAL_HEADER, 0);
}

/* Invalidates the record: a 4-byte write within one page, never torn. */
static int journal_clear(int jfd)
{
    static const unsigned char zero[4] = {0, 0, 0, 0};
    return pwrite_all(jfd, zero, sizeof zero, 0);
}

hilal_status hilal_h5_journal_write_record(const char *journal, uint64_t offset,
                                           const void *data, size_t len, hilal_error *err)
{
    int jfd = open(journal, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (jfd < 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot open %s: %s", journal, strerror(errno));
    int rc = journal_put(jfd, offset, data, len);
    int e = errno;
    close(jfd);
    if (rc != 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write %s: %s", journal, strerror(e));
    return HILAL_OK;
}

hilal_status hilal_h5_journal_replay(const char *path, int *replayed, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char journal[4200];
    unsigned char head[JOURNAL_HEADER];
    unsigned char *data = NULL;
    int jfd = -1, fd = -1;
    *replayed = 0;
    hilal_h5_journal_path(path, journal, sizeof journal);
    jfd = open(journal, O_RDWR | O_CLOEXEC);
    if (jfd < 0) {
        if (errno != ENOENT)
            st = hilal_error_set(err, HILAL_ERR_IO, "cannot open %s: %s", journal, strerror(errno));
        goto cleanup;
    }
    ssize_t got = pread(jfd, head, sizeof head, 0);
    if (got != (ssize_t)sizeof head || get_u32(head) != JOURNAL_MAGIC)
        goto done; /* empty, invalidated, or torn before its header */
    uint64_t offset = get_u64(head + 8), len = get_u64(head + 16);
    if (len > ((uint64_t)1 << 30) || offset > (uint64_t)JOURNAL_MAXADDR)
        goto done;
    data = malloc(len > 0 ? (size_t)len : 1);
    if (data == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory replaying %s", journal);
        goto cleanup;
    }
    if (pread(jfd, data, (size_t)len, JOURNAL_HEADER) != (ssize_t)len)
        goto done; /* torn: its in-place write never started */
    uint32_t crc = crc32_update(0, head + 8, JOURNAL_HEADER - 8);
    crc = crc32_update(crc, data, (size_t)len);
    if (crc != get_u32(head + 4))
        goto done;
    /* A complete record: its in-place write may be torn; write it again. */
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 || pwrite_all(fd, data, (size_t)len, (off_t)offset) != 0) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot replay %s into %s: %s", journal, path,
                             strerror(errno));
        goto cleanup;
    }
    *replayed = 1;
done:
    if (journal_clear(jfd) != 0)
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot clear %s: %s", journal, strerror(errno));
cleanup:
    if (fd >= 0)
        close(fd);
    if (jfd >= 0)
        close(jfd);
    free(data);
    return st;
}

/* The driver's file: HDF5's public part first. */
typedef struct jfile {
    H5FD_t pub;
    int fd;
    int jfd;         /* journal, -1 when read-only */
    haddr_t eoa, eof;
    dev_t device;
    ino_t inode;
    char journal[4200];
} jfile;

static herr_t jfail(const char *func, hid_t minor, const char *what)
{
    H5Epush2(H5E_DEFAULT, __FILE__, func, __LINE__, H5E_ERR_CLS, H5E_VFL, minor, "%s: %s", what,
             strerror(errno));
    return -1;
}

static H5FD_t *j_open(const char *name, unsigned flags, hid_t fapl, haddr_t maxaddr)
{
    (void)fapl;
    int o = (flags & H5F_ACC_RDWR) ? O_RDWR : O_RDONLY;
    if (flags & H5F_ACC_TRUNC)
        o |= O_TRUNC;
    if (flags & H5F_ACC_CREAT)
        o |= O_CREAT;
    if (flags & H5F_ACC_EXCL)
        o |= O_EXCL;
    struct stat sb;
    jfile *f = NULL;
    if (name == NULL || *name == '\0' || maxaddr == 0 || maxaddr == HADDR_UNDEF) {
        errno = EINVAL;
        jfail("j_open", H5E_CANTOPENFILE, "bad file name or address range");
        return NULL;
    }
    int fd = open(name, o | O_CLOEXEC, 0644);
    if (fd < 0) {
        jfail("j_open", H5E_CANTOPENFILE, "cannot open the file");
        return NULL;
    }
    if (fstat(fd, &sb) != 0 || (f = calloc(1, sizeof *f)) == NULL) {
        jfail("j_open", H5E_CANTOPENFILE, "cannot stat the file");
        close(fd);
        return NULL;
    }
    f->fd = fd;
    f->jfd = -1;
    f->eof = (haddr_t)sb.st_size;
    f->device = sb.st_dev;
    f->inode = sb.st_ino;
    if (flags & H5F_ACC_RDWR) {
        hilal_h5_journal_path(name, f->journal, sizeof f->journal);
        f->jfd = open(f->journal, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (f->jfd < 0) {
            jfail("j_open", H5E_CANTOPENFILE, "cannot open the journal next to the file");
            close(fd);
            free(f);
            return NULL;
        }
    }
    return &f->pub;
}

static herr_t j_close(H5FD_t *file)
{
    jfile *f = (jfile *)file;
    herr_t rc = 0;
    if (close(f->fd) != 0)
        rc = jfail("j_close", H5E_CANTCLOSEFILE, "cannot close the file");
    if (f->jfd >= 0) {
        /* Every write completed: the journal holds no valid record. */
        close(f->jfd);
        if (rc == 0)
            unlink(f->journal);
    }
    free(f);
    return rc;
}

static int j_cmp(const H5FD_t *a, const H5FD_t *b)
{
    const jfile *x = (const jfile *)a, *y = (const jfile *)b;
    if (x->device != y->device)
        return x->device < y->device ? -1 : 1;
    if (x->inode != y->inode)
        return x->inode < y->inode ? -1 : 1;
    return 0;
}

static herr_t j_query(const H5FD_t *file, unsigned long *flags)
{
    (void)file;
    /* As HDF5's sec2 driver, SWMR included. */
    *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
             H5FD_FEAT_AGGREGATE_SMALLDATA | H5FD_FEAT_POSIX_COMPAT_HANDLE |
             H5FD_FEAT_SUPPORTS_SWMR_IO | H5FD_FEAT_DEFAULT_VFD_COMPATIBLE;
    return 0;
}

static haddr_t j_get_eoa(const H5FD_t *file, H5FD_mem_t type)
{
    (void)type;
    return ((const jfile *)file)->eoa;
}

static herr_t j_set_eoa(H5FD_t *file, H5FD_mem_t type, haddr_t addr)
{
    (void)type;
    ((jfile *)file)->eoa = addr;
    return 0;
}

static haddr_t j_get_eof(const H5FD_t *file, H5FD_mem_t type)
{
    (void)type;
    return ((const jfile *)file)->eof;
}

static herr_t j_get_handle(H5FD_t *file, hid_t fapl, void **handle)
{
    (void)fapl;
    *handle = &((jfile *)file)->fd;
    return 0;
}

static herr_t j_read(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size,
                     void *buf)
{
    (void)type;
    (void)dxpl;
    jfile *f = (jfile *)file;
    char *p = buf;
    while (size > 0) {
        ssize_t n = pread(f->fd, p, size, (off_t)addr);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return jfail("j_read", H5E_READERROR, "cannot read the file");
        if (n == 0) {
            /* Past the end of the file: zeros, as sec2 gives. */
            memset(p, 0, size);
            break;
        }
        p += n;
        size -= (size_t)n;
        addr += (haddr_t)n;
    }
    return 0;
}

static herr_t j_write(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size,
                      const void *buf)
{
    (void)dxpl;
    jfile *f = (jfile *)file;
    int journaled = type != H5FD_MEM_DRAW && f->jfd >= 0;
    if (journaled && journal_put(f->jfd, (uint64_t)addr, buf, size) != 0)
        return jfail("j_write", H5E_WRITEERROR, "cannot write the journal");
    if (pwrite_all(f->fd, buf, size, (off_t)addr) != 0)
        return jfail("j_write", H5E_WRITEERROR, "cannot write the file");
    if (journaled && journal_clear(f->jfd) != 0)
        return jfail("j_write", H5E_WRITEERROR, "cannot clear the journal");
    if (addr + size > f->eof)
        f->eof = addr + size;
    return 0;
}

static herr_t j_flush(H5FD_t *file, hid_t dxpl, hbool_t closing)
{
    (void)file;
    (void)dxpl;
    (void)closing;
    return 0;
}

static herr_t j_truncate(H5FD_t *file, hid_t dxpl, hbool_t closing)
{
    (void)dxpl;
    (void)closing;
    jfile *f = (jfile *)file;
    if (f->eoa != f->eof) {
        if (ftruncate(f->fd, (off_t)f->eoa) != 0)
            return jfail("j_truncate", H5E_SEEKERROR, "cannot set the file size");
        f->eof = f->eoa;
    }
    return 0;
}

static herr_t j_lock(H5FD_t *file, hbool_t rw)
{
    jfile *f = (jfile *)file;
    if (flock(f->fd, (rw ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
        if (errno == ENOSYS)
            return 0; /* file system without flock(): as HDF5 when told to ignore it */
        return jfail("j_lock", H5E_CANTLOCKFILE, "unable to lock file");
    }
    return 0;
}

static herr_t j_unlock(H5FD_t *file)
{
    jfile *f = (jfile *)file;
    if (flock(f->fd, LOCK_UN) != 0 && errno != ENOSYS)
        return jfail("j_unlock", H5E_CANTUNLOCKFILE, "unable to unlock file");
    return 0;
}

static const H5FD_class_t journal_class = {
    "hilal_journal",      /* name */
    JOURNAL_MAXADDR,      /* maxaddr */
    H5F_CLOSE_WEAK,       /* fc_degree */
    NULL,                 /* terminate */
    NULL,                 /* sb_size */
    NULL,                 /* sb_encode */
    NULL,                 /* sb_decode */
    0,                    /* fapl_size */
    NULL,                 /* fapl_get */
    NULL,                 /* fapl_copy */
    NULL,                 /* fapl_free */
    0,                    /* dxpl_size */
    NULL,                 /* dxpl_copy */
    NULL,                 /* dxpl_free */
    j_open,               /* open */
    j_close,              /* close */
    j_cmp,                /* cmp */
    j_query,              /* query */
    NULL,                 /* get_type_map */
    NULL,                 /* alloc */
    NULL,                 /* free */
    j_get_eoa,            /* get_eoa */
    j_set_eoa,            /* set_eoa */
    j_get_eof,            /* get_eof */
    j_get_handle,         /* get_handle */
    j_read,               /* read */
    j_write,              /* write */
    j_flush,              /* flush */
    j_truncate,           /* truncate */
    j_lock,               /* lock */
    j_unlock,             /* unlock */
    H5FD_FLMAP_DICHOTOMY, /* fl_map */
};

static hid_t journal_driver_id = H5I_INVALID_HID;
static pthread_mutex_t journal_driver_lock = PTHREAD_MUTEX_INITIALIZER;

hid_t hilal_h5_journal_driver(void)
{
    pthread_mutex_lock(&journal_driver_lock);
    if (journal_driver_id < 0 || H5Iget_type(journal_driver_id) != H5I_VFL)
        journal_driver_id = H5FDregister(&journal_class);
    hid_t id = journal_driver_id;
    pthread_mutex_unlock(&journal_driver_lock);
    return id;
}

/* A file-access property list for a writer: hilal_h5_fapl(1) with the
 * journaling driver. */
static hid_t writer_fapl(void)
{
    hid_t fapl = hilal_h5_fapl(1);
    hid_t driver = hilal_h5_journal_driver();
    if (fapl >= 0 && (driver < 0 || H5Pset_driver(fapl, driver, NULL) < 0)) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

/* Clears the superblock status flags of a file whose writer died, like
 * `h5clear -s --increment` (HDF5 1.10 tools/src/h5clear/h5clear.c): the
 * three file-access properties used there are registered in every
 * file-access property list of the library although not declared in its
 * public headers. Clearing the flags alone (`h5clear -s`) would keep the
 * end-of-allocation address stored in the superblock; data written after it
 * by the dead writer would then be overwritten by the next allocation, so
 * the EOA is also moved past the end of the file. */
static hilal_status clear_status_flags(const char *path, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = writer_fapl(), fid = H5I_INVALID_HID;
    hbool_t yes = 1;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    if (H5Pexist(fapl, "clear_status_flags") <= 0 || H5Pexist(fapl, "skip_eof_check") <= 0 ||
        H5Pexist(fapl, "null_fsm_addr") <= 0) {
        hilal_h5_clear();
        st = hilal_error_set(err, HILAL_ERR_HDF5,
                             "%s was left open by a writer that stopped, and this HDF5 library "
                             "cannot clear the flag; run `h5clear -s --increment %s` (not "
                             "`h5clear -s` alone) and try again", path, path);
        goto cleanup;
    }
    if (H5Pset(fapl, "clear_status_flags", &yes) < 0 || H5Pset(fapl, "skip_eof_check", &yes) < 0 ||
        H5Pset(fapl, "null_fsm_addr", &yes) < 0) {
        st = hilal_h5_error(err, "cannot set the recovery properties for %s", path);
        goto cleanup;
    }
    fid = H5Fopen(path, H5F_ACC_RDWR, fapl);
    if (fid < 0) {
        st = hilal_h5_error(err, "cannot open %s to clear the flags left by a writer that stopped", path);
        goto cleanup;
    }
    /* EOA = max(EOA, EOF) + 1 MiB, as `h5clear --increment` does by default. */
    if (H5Fincrement_filesize(fid, (hsize_t)1 << 20) < 0) {
        st = hilal_h5_error(err, "cannot move the end of allocation of %s past its end of file", path);
        goto cleanup;
    }
cleanup:
    if (fid >= 0 && H5Fclose(fid) < 0 && st == HILAL_OK)
        st = hilal_h5_error(err, "cannot close %s after clearing its flags", path);
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}

hilal_status hilal_h5_open_swmr_write(const char *path, int *recovered, hid_t *fid,
                                      hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = writer_fapl();
    char detail[1024];
    int replayed = 0;
    *fid = H5I_INVALID_HID;
    *recovered = 0;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list with the journaling driver");
        goto cleanup;
    }
    /* First repair a metadata write that a dead writer may have torn. */
    st = hilal_h5_journal_replay(path, &replayed, err);
    if (st != HILAL_OK)
        goto cleanup;
    *fid = H5Fopen(path, H5F_ACC_RDWR | H5F_ACC_SWMR_WRITE, fapl);
    if (*fid >= 0) {
        *recovered = replayed;
        goto cleanup;
    }
    hilal_h5_stack_text(detail, sizeof detail);
    if (strstr(detail, "unable to lock file") != NULL || strstr(detail, "unable to lock the file") != NULL) {
        /* HDF5 readers hold a shared flock() while open (unless opened with
         * file locking off), which a starting writer cannot override. */
        st = hilal_h5_fail(err, HILAL_ERR_IO,
                           "cannot open %s for writing: another process has it open for reading "
                           "since before this writer started; close it, or open readers with "
                           "HDF5 file locking off (h5py: locking=False; or "
                           "HDF5_USE_FILE_LOCKING=FALSE)", path);
        goto cleanup;
    }
    if (strstr(detail, "already open for write") == NULL) {
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot open %s for writing", path);
        goto cleanup;
    }
    /* The superblock says a writer has the file open. The caller holds the
     * writer lock, so that writer is gone: recover. */
    hilal_h5_clear();
    st = clear_status_flags(path, err);
    if (st != HILAL_OK)
        goto cleanup;
    *recovered = 1;
    *fid = H5Fopen(path, H5F_ACC_RDWR | H5F_ACC_SWMR_WRITE, fapl);
    if (*fid < 0)
        st = hilal_h5_error(err, "cannot open %s for writing after clearing the flags of a writer that stopped", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}

hilal_status hilal_h5_open_swmr_read(const char *path, hid_t *fid, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char detail[1024];
    /* No file lock: a reader left open must not stop a writer from
     * starting (SWMR readers tolerate a concurrent writer). */
    hid_t fapl = hilal_h5_fapl(0), fapl_lock = H5I_INVALID_HID;
    *fid = H5I_INVALID_HID;
    /* A SWMR reader that meets a metadata block with a bad checksum (the
     * writer is halfway through writing it) re-reads it with exponentially
     * growing pauses (1 ns, 2 ns, ...). HDF5's default of 100 attempts adds
     * up to hours; 30 attempts wait up to about a second in all, far longer
     * than any single metadata write takes, then fail with a message. */
    if (fapl < 0 || H5Pset_metadata_read_attempts(fapl, SWMR_READ_ATTEMPTS) < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    *fid = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    if (*fid >= 0)
        goto cleanup;
    /* This process already has the file open for writing, with locking:
     * HDF5 shares that open file and wants the same locking setting. */
    hilal_h5_stack_text(detail, sizeof detail);
    if (strstr(detail, "file locking flag values don't match") != NULL) {
        hilal_h5_clear();
        fapl_lock = hilal_h5_fapl(1);
        if (fapl_lock >= 0 && H5Pset_metadata_read_attempts(fapl_lock, SWMR_READ_ATTEMPTS) >= 0)
            *fid = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl_lock);
    }
    if (*fid < 0)
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot open %s for reading", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    if (fapl_lock >= 0)
        H5Pclose(fapl_lock);
    return st;
}

/* ------------------------------------------------------------------------
 * Rows
 * ------------------------------------------------------------------------ */

#define MAX_RANK 4

/* Dimensions of a dataset; rank returned in *rank. */
static hilal_status get_dims(hid_t dset, hsize_t dims[MAX_RANK], int *rank, hilal_error *err)
{
    hid_t space = H5Dget_space(dset);
    if (space < 0)
        return hilal_h5_error(err, "cannot get a dataspace");
    *rank = H5Sget_simple_extent_ndims(space);
    if (*rank < 1 || *rank > MAX_RANK || H5Sget_simple_extent_dims(space, dims, NULL) < 0) {
        H5Sclose(space);
        return hilal_h5_error(err, "unexpected dataspace (rank %d)", *rank);
    }
    H5Sclose(space);
    return HILAL_OK;
}

hilal_status hilal_h5_nrows(hid_t dset, int refresh, hsize_t *n, hilal_error *err)
{
    hsize_t dims[MAX_RANK];
    int rank = 0;
    *n = 0;
    if (refresh && H5Drefresh(dset) < 0)
        return hilal_h5_error(err, "cannot refresh a dataset");
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st == HILAL_OK)
        *n = dims[0];
    return st;
}

hilal_status hilal_h5_set_nrows(hid_t dset, hsize_t n, hilal_error *err)
{
    hsize_t dims[MAX_RANK];
    int rank = 0;
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st != HILAL_OK)
        return st;
    if (dims[0] == n)
        return HILAL_OK;
    dims[0] = n;
    if (H5Dset_extent(dset, dims) < 0)
        return hilal_h5_error(err, "cannot set a dataset to %llu rows", (unsigned long long)n);
    return HILAL_OK;
}

/* Selects rows [start, start+n) of the file space and makes a matching
 * memory space. */
static hilal_status select_rows(hid_t dset, hsize_t start, hsize_t n, hid_t *fspace,
                                hid_t *mspace, hilal_error *err)
{
    hsize_t dims[MAX_RANK], off[MAX_RANK] = {0}, cnt[MAX_RANK];
    int rank = 0;
    *fspace = *mspace = H5I_INVALID_HID;
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st != HILAL_OK)
        return st;
    if (start + n > dims[0])
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "rows %llu..%llu are beyond the %llu rows of a dataset",
                               (unsigned long long)start, (unsigned long long)(start + n),
                               (unsigned long long)dims[0]);
    for (int i = 0; i < rank; i++)
        cnt[i] = dims[i];
    off[0] = start;
    cnt[0] = n;
    *fspace = H5Dget_space(dset);
    *mspace = H5Screate_simple(rank, cnt, NULL);
    if (*fspace < 0 || *mspace < 0 ||
        H5Sselect_hyperslab(*fspace, H5S_SELECT_SET, off, NULL, cnt, NULL) < 0) {
        if (*fspace >= 0)
            H5Sclose(*fspace);
        if (*mspace >= 0)
            H5Sclose(*mspace);
        *fspace = *mspace = H5I_INVALID_HID;
        return hilal_h5_error(err, "cannot select rows of a dataset");
    }
    return HILAL_OK;
}

/* Moves rows start .. start + n - 1 of dset between the file and memory of
 * type mtype: into rbuf when it is not NULL, else out of wbuf. */
static hilal_status transfer_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n,
                                  void *rbuf, const void *wbuf, hilal_error *err)
{
    hid_t fspace = H5I_INVALID_HID, mspace = H5I_INVALID_HID;
    herr_t rc = 0;
    hilal_status st = select_rows(dset, start, n, &fspace, &mspace, err);
    if (st == HILAL_OK)
        rc = rbuf != NULL ? H5Dread(dset, mtype, mspace, fspace, H5P_DEFAULT, rbuf)
                          : H5Dwrite(dset, mtype, mspace, fspace, H5P_DEFAULT, wbuf);
    if (st == HILAL_OK && rc < 0)
        st = hilal_h5_error(err, "cannot %s rows %llu..%llu", rbuf != NULL ? "read" : "write",
                            (unsigned long long)start, (unsigned long long)(start + n - 1));
    if (fspace >= 0)
        H5Sclose(fspace);
    if (mspace >= 0)
        H5Sclose(mspace);
    return st;
}

hilal_status hilal_h5_write_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n,
                                 const void *buf, hilal_error *err)
{
    hsize_t nrows;
    hilal_status st;
    if (n == 0)
        return HILAL_OK;
    st = hilal_h5_nrows(dset, 0, &nrows, err);
    if (st == HILAL_OK && start + n > nrows)
        st = hilal_h5_set_nrows(dset, start + n, err);
    if (st == HILAL_OK)
        st = transfer_rows(dset, mtype, start, n, NULL, buf, err);
    return st;
}

hilal_status hilal_h5_read_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n, void *buf,
                                hilal_error *err)
{
    if (n == 0)
        return HILAL_OK;
    return transfer_rows(dset, mtype, start, n, buf, NULL, err);
}

/* ------------------------------------------------------------------------
 * Attributes
 * ------------------------------------------------------------------------ */

/* A scalar attribute of file type ftype, written from value (memory type
 * mtype). */
static hilal_status attr_write(hid_t loc, const char *name, hid_t ftype, hid_t mtype,
                               const void *value, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t space = H5Screate(H5S_SCALAR), attr = H5I_INVALID_HID;
    if (space >= 0 && ftype >= 0)
        attr = H5Acreate2(loc, name, ftype, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr < 0 || H5Awrite(attr, mtype, value) < 0)
        st = hilal_h5_error(err, "cannot write attribute %s", name);
    if (attr >= 0)
        H5Aclose(attr);
    if (space >= 0)
        H5Sclose(space);
    return st;
}

hilal_status hilal_h5_attr_write_int(hid_t loc, const char *name, long long value,
                                     hilal_error *err)
{
    return attr_write(loc, name, H5T_STD_I64LE, H5T_NATIVE_LLONG, &value, err);
}

hilal_status hilal_h5_attr_write_string(hid_t loc, const char *name, const char *value,
                                        hilal_error *err)
{
    /* A fixed-length, NUL-padded string of the value's length (at least 1). */
    size_t len = strlen(value);
    hid_t type = H5Tcopy(H5T_C_S1);
    if (type >= 0 && (H5Tset_size(type, len > 0 ? len : 1) < 0 ||
                      H5Tset_strpad(type, H5T_STR_NULLPAD) < 0)) {
        H5Tclose(type);
        type = H5I_INVALID_HID;
    }
    hilal_status st = attr_write(loc, name, type, type, len > 0 ? value : "", err);
    if (type >= 0)
        H5Tclose(type);
    return st;
}

hilal_status hilal_h5_attr_read_int(hid_t loc, const char *name, long long *value,
                                    hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t attr = H5I_INVALID_HID;
    htri_t exists = H5Aexists(loc, name);
    if (exists <= 0) {
        hilal_h5_clear();
        return hilal_error_set(err, HILAL_ERR_NOTFOUND, "attribute %s is missing", name);
    }
    attr = H5Aopen(loc, name, H5P_DEFAULT);
    if (attr < 0 || H5Aread(attr, H5T_NATIVE_LLONG, value) < 0)
        st = hilal_h5_error(err, "cannot read attribute %s", name);
    if (attr >= 0)
        H5Aclose(attr);
    return st;
}

hilal_status hilal_h5_attr_read_string(hid_t loc, const char *name, char *buf, size_t len,
                                       hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t attr = H5I_INVALID_HID, ftype = H5I_INVALID_HID, mtype = H5I_INVALID_HID;
    char *tmp = NULL;
    htri_t exists = H5Aexists(loc, name);
    buf[0] = '\0';
    if (exists <= 0) {
        hilal_h5_clear();
        return hilal_error_set(err, HILAL_ERR_NOTFOUND, "attribute %s is missing", name);
    }
    attr = H5Aopen(loc, name, H5P_DEFAULT);
    if (attr >= 0)
        ftype = H5Aget_type(attr);
    if (attr < 0 || ftype < 0 || H5Tget_class(ftype) != H5T_STRING || H5Tis_variable_str(ftype) != 0) {
        st = hilal_h5_error(err, "attribute %s is not a fixed-length string", name);
        goto cleanup;
    }
    size_t size = H5Tget_size(ftype);
    tmp = calloc(size + 1, 1);
    mtype = H5Tcopy(ftype);
    if (tmp == NULL || mtype < 0) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (H5Aread(attr, mtype, tmp) < 0) {
        st = hilal_h5_error(err, "cannot read attribute %s", name);
        goto cleanup;
    }
    snprintf(buf, len, "%s", tmp);
cleanup:
    free(tmp);
    if (mtype >= 0)
        H5Tclose(mtype);
    if (ftype >= 0)
        H5Tclose(ftype);
    if (attr >= 0)
        H5Aclose(attr);
    return st;
}

/* ------------------------------------------------------------------------
 * astropy column metadata
 * ------------------------------------------------------------------------ */

/* Appends s to the growing string *buf. */
static int append(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s);
    if (*len + n + 1 > *cap) {
        size_t nc = (*cap + n + 1) * 2;
        char *p = realloc(*buf, nc);
        if (p == NULL)
            return -1;
        *buf = p;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n + 1);
    *len += n;
    return 0;
}

/* Appends s as a YAML single-quoted scalar (quotes doubled), which needs no
 * other escapes for printable text. */
static int append_quoted(char **buf, size_t *len, size_t *cap, const char *s)
{
    char one[2] = {0, 0};
    if (append(buf, len, cap, "'") != 0)
        return -1;
    for (; *s; s++) {
        one[0] = (*s == '\n' || *s == '\r' || *s == '\t') ? ' ' : *s;
        if (append(buf, len, cap, one) != 0 || (*s == '\'' && append(buf, len, cap, "'") != 0))
            return -1;
    }
    return append(buf, len, cap, "'");
}

hilal_status hilal_h5_write_astropy_meta(hid_t loc, const char *table,
                                         const hilal_h5_colmeta *cols, size_t ncols,
                                         const char *const *meta_kv, size_t nmeta,
                                         hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t nlines = 1 + ncols + (nmeta > 0 ? 1 + nmeta : 0);
    char **lines = calloc(nlines, sizeof *lines);
    char *block = NULL, dname[256];
    hid_t type = H5I_INVALID_HID, space = H5I_INVALID_HID, dset = H5I_INVALID_HID;
    size_t k = 0, maxlen = 1;
    if (lines == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    /* The layout astropy writes (astropy/io/misc/hdf5.py, write_table_hdf5
     * with serialize_meta=True, via astropy.table.meta.get_yaml_from_table):
     *   datatype:
     *   - {name: x, unit: pix, datatype: float64, description: ...}
     *   meta: !!omap
     *   - {key: value}                                                    */
    lines[k++] = strdup("datatype:");
    for (size_t i = 0; i < ncols; i++) {
        char *b = NULL;
        size_t len = 0, cap = 0;
        int bad = append(&b, &len, &cap, "- {name: ") || append(&b, &len, &cap, cols[i].name);
        if (!bad && cols[i].unit != NULL && cols[i].unit[0] != '\0')
            bad = append(&b, &len, &cap, ", unit: ") || append_quoted(&b, &len, &cap, cols[i].unit);
        if (!bad)
            bad = append(&b, &len, &cap, ", datatype: ") || append(&b, &len, &cap, cols[i].datatype);
        if (!bad && cols[i].description != NULL && cols[i].description[0] != '\0')
            bad = append(&b, &len, &cap, ", description: ") ||
                  append_quoted(&b, &len, &cap, cols[i].description);
        if (!bad)
            bad = append(&b, &len, &cap, "}");
        if (bad) {
            free(b);
            b = NULL;
        }
        lines[k++] = b;
    }
    if (nmeta > 0) {
        lines[k++] = strdup("meta: !!omap");
        for (size_t i = 0; i < nmeta; i++) {
            char *b = NULL;
            size_t len = 0, cap = 0;
            if (append(&b, &len, &cap, "- {") || append(&b, &len, &cap, meta_kv[2 * i]) ||
                append(&b, &len, &cap, ": ") || append_quoted(&b, &len, &cap, meta_kv[2 * i + 1]) ||
                append(&b, &len, &cap, "}")) {
                free(b);
                b = NULL;
            }
            lines[k++] = b;
        }
    }
    for (size_t i = 0; i < nlines; i++) {
        if (lines[i] == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        if (strlen(lines[i]) > maxlen)
            maxlen = strlen(lines[i]);
    }
    /* Fixed-length, NUL-padded ASCII strings, as numpy's 'S<n>' gives. */
    block = calloc(nlines, maxlen);
    if (block == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; i < nlines; i++)
        memcpy(block + i * maxlen, lines[i], strlen(lines[i]));
    hsize_t dim = nlines;
    type = H5Tcopy(H5T_C_S1);
    space = H5Screate_simple(1, &dim, NULL);
    snprintf(dname, sizeof dname, "%s.__table_column_meta__", table);
    if (type < 0 || space < 0 || H5Tset_size(type, maxlen) < 0 ||
        H5Tset_strpad(type, H5T_STR_NULLPAD) < 0) {
        st = hilal_h5_error(err, "cannot make the column-metadata type of %s", table);
        goto cleanup;
    }
    dset = H5Dcreate2(loc, dname, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (dset < 0 || H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, block) < 0)
        st = hilal_h5_error(err, "cannot write %s", dname);
cleanup:
    if (dset >= 0)
        H5Dclose(dset);
    if (space >= 0)
        H5Sclose(space);
    if (type >= 0)
        H5Tclose(type);
    free(block);
    if (lines != NULL)
        for (size_t i = 0; i < nlines; i++)
            free(lines[i]);
    free(lines);
    return st;
}
