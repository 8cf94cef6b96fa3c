/* The test guest's disk writer: appends a sequence number to the raw disk, one 512-byte record
 * per write, each written with O_DIRECT|O_DSYNC (the write returns only once the device says it
 * is stable), and publishes the last number so acknowledged in a file that the guest's HTTP
 * server serves. At boot it reads the disk back and goes on after the highest number it finds,
 * so a test can check that no acknowledged write was lost across a failover or a migration.
 *
 * Usage: seqwriter DEVICE STATUS_FILE [INTERVAL_MS]
 * STATUS_FILE gets "LAST RECOVERED WRITES\n": the last acknowledged number, the number found on
 * the disk at boot, and the writes acknowledged since boot. It is replaced atomically (rename).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RECORD 512
#define MAX_RECORDS 8192 /* a ring of 4 MiB: at most this many records are scanned at boot */
static const char MAGIC[8] = {'T', 'N', 'D', 'M', 'S', 'E', 'Q', '1'};

struct record {
    char magic[8];
    uint64_t seq;
    uint64_t check; /* ~seq: a torn or stale sector does not pass for a record */
};

static void publish(const char *path, uint64_t last, uint64_t recovered, uint64_t writes) {
    char tmp[256], text[96];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int n = snprintf(text, sizeof text, "%llu %llu %llu\n", (unsigned long long)last, (unsigned long long)recovered, (unsigned long long)writes);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    if (write(fd, text, (size_t)n) == n) {
        close(fd);
        rename(tmp, path);
    } else {
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: seqwriter DEVICE STATUS_FILE [INTERVAL_MS]\n");
        return 2;
    }
    long interval_ms = argc > 3 ? atol(argv[3]) : 5;
    int fd = open(argv[1], O_RDWR | O_DIRECT | O_DSYNC);
    if (fd < 0) {
        perror("seqwriter: open");
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    long records = size / RECORD;
    if (records > MAX_RECORDS) records = MAX_RECORDS;
    if (records < 2) {
        fprintf(stderr, "seqwriter: %s is too small\n", argv[1]);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, (size_t)records * RECORD) != 0) return 1;
    if (pread(fd, buf, (size_t)records * RECORD, 0) != (ssize_t)(records * RECORD)) {
        perror("seqwriter: read");
        return 1;
    }
    uint64_t last = 0;
    for (long i = 0; i < records; i++) {
        struct record *r = (struct record *)((char *)buf + i * RECORD);
        if (memcmp(r->magic, MAGIC, sizeof MAGIC) == 0 && r->check == ~r->seq && r->seq > last) last = r->seq;
    }
    uint64_t recovered = last, writes = 0;
    publish(argv[2], last, recovered, writes);
    printf("TANDEM-SEQ-RECOVERED %llu\n", (unsigned long long)recovered);
    fflush(stdout);
    memset(buf, 0, RECORD);
    struct timespec pause = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
    for (;;) {
        uint64_t next = last + 1;
        struct record *r = (struct record *)buf;
        memcpy(r->magic, MAGIC, sizeof MAGIC);
        r->seq = next;
        r->check = ~next;
        if (pwrite(fd, buf, RECORD, (off_t)(next % (uint64_t)records) * RECORD) == RECORD) {
            last = next;
            writes++;
            publish(argv[2], last, recovered, writes);
        }
        nanosleep(&pause, NULL);
    }
}
