/* Helpers shared by the fuzz targets: see fuzz.h. */
#include "fuzz.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

#ifndef UM_FUZZ_DATA
#define UM_FUZZ_DATA "tests/fuzz/data"
#endif

static char s_scratch[4096];

static void s_remove_scratch(void)
{
    DIR *dir = opendir(s_scratch);
    if (dir) {
        struct dirent *e;
        while ((e = readdir(dir)) != NULL) {
            char path[8192];
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof path, "%s/%s", s_scratch, e->d_name);
            unlink(path);
        }
        closedir(dir);
    }
    rmdir(s_scratch);
}

const char *um_fuzz_scratch_dir(void)
{
    if (s_scratch[0])
        return s_scratch;
    const char *tmp = getenv("TMPDIR");
    snprintf(s_scratch, sizeof s_scratch, "%s/unmaskd-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(s_scratch)) {
        perror("fuzz: cannot create the scratch folder");
        abort();
    }
    atexit(s_remove_scratch);
    return s_scratch;
}

const char *um_fuzz_write(const char *name, const uint8_t *data, size_t size)
{
    static char path[8192];
    snprintf(path, sizeof path, "%s/%s", um_fuzz_scratch_dir(), name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        perror(path);
        abort();
    }
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) {
            perror(path);
            abort();
        }
        done += (size_t)n;
    }
    close(fd);
    return path;
}

const char *um_fuzz_data_dir(const char *sub)
{
    static char path[4096];
    const char *root = getenv("UM_FUZZ_DATA");
    snprintf(path, sizeof path, "%s/%s", root && *root ? root : UM_FUZZ_DATA, sub);
    return path;
}

int um_fuzz_utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned c = p[i];
        size_t need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            lo = c == 0xE0 ? 0xA0 : 0x80;
            hi = c == 0xED ? 0x9F : 0xBF;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            lo = c == 0xF0 ? 0x90 : 0x80;
            hi = c == 0xF4 ? 0x8F : 0xBF;
        } else {
            return 0;
        }
        if (len - i <= need)
            return 0;
        if (p[i + 1] < lo || p[i + 1] > hi)
            return 0;
        for (size_t k = 2; k <= need; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                return 0;
        i += need + 1;
    }
    return 1;
}

/* Format the message as the daemon's log would, so bad format arguments still surface. */
static void s_log(int level, const char *plugin, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    (void)level;
    (void)plugin;
}

static void *s_alloc(size_t size)
{
    return malloc(size);
}

static void s_free(void *ptr)
{
    free(ptr);
}

/* Tokenizers use only log, alloc and free; the remasking services stay NULL. */
const um_host_t um_fuzz_host = {
    .struct_size = sizeof(um_host_t),
    .log = s_log,
    .alloc = s_alloc,
    .free = s_free,
};
