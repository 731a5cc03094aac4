/*
 * main() for a fuzz target built without libFuzzer: run LLVMFuzzerTestOneInput once on
 * each file named on the command line, and on each regular file of each folder named.
 * Arguments that start with '-' (libFuzzer options) are ignored, so one command line
 * replays inputs with either build. make check runs the seed corpora and regression
 * inputs this way (tests/fuzz/replay.sh), with whatever sanitizers CFLAGS turned on.
 * With --enable-fuzz, UM_FUZZ_LIBFUZZER is defined and libFuzzer provides main().
 */
#ifndef UM_FUZZ_LIBFUZZER

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

/* Read path and run the target on it. Returns 0, or -1 when the file cannot be read. */
static int s_run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    unsigned char *data = malloc(cap);
    size_t n;
    while (data && (n = fread(data + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            unsigned char *grown = realloc(data, cap * 2);
            if (!grown) {
                free(data);
                data = NULL;
                break;
            }
            data = grown;
            cap *= 2;
        }
    }
    int failed = ferror(f) || !data;
    fclose(f);
    if (failed) {
        fprintf(stderr, "%s: cannot read the file\n", path);
        free(data);
        return -1;
    }
    fprintf(stderr, "Running: %s\n", path);
    LLVMFuzzerTestOneInput(data, len);
    free(data);
    return 0;
}

static int s_name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Run every regular file of dir in name order; returns the count run, or -1. */
static int s_run_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "%s: %s\n", dir, strerror(errno));
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **grown = realloc(names, cap * sizeof *names);
            if (!grown)
                break;
            names = grown;
        }
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, s_name_cmp);

    int count = 0;
    for (size_t i = 0; i < n; i++) {
        char path[8192];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (names[i] && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            if (s_run_file(path) != 0)
                count = -1;
            else if (count >= 0)
                count++;
        }
        free(names[i]);
    }
    free(names);
    return count;
}

int main(int argc, char **argv)
{
    int status = EXIT_SUCCESS, total = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (argv[i][0] == '-')
            continue;
        int ran;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode))
            ran = s_run_dir(argv[i]);
        else
            ran = s_run_file(argv[i]) == 0 ? 1 : -1;
        if (ran < 0)
            status = EXIT_FAILURE;
        else
            total += ran;
    }
    fprintf(stderr, "%s: ran %d inputs\n", argv[0], total);
    return status;
}

#endif /* UM_FUZZ_LIBFUZZER */
