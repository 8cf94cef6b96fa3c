/* The test guest's QEMU guest agent: the part of the QGA protocol that Tandem uses, on the
 * virtio-serial port named org.qemu.guest_agent.0. It answers `guest-sync` (echoing the id, so
 * the host knows which answer is the fresh one), `guest-ping`, and `guest-shutdown` (no answer,
 * as the real agent: it prints TANDEM-GUEST-AGENT-SHUTDOWN on the console, syncs and powers
 * the guest off); any other command gets QGA's CommandNotFound error. One JSON object per
 * line, as the host sends them. Without the port (the VM's spec has no guest agent) it exits.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

static int open_port(void) {
    for (int attempt = 0; attempt < 50; attempt++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[512], name[128] = {0};
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            FILE *f = fopen(path, "r");
            if (!f) continue;
            if (fgets(name, sizeof name, f) && strncmp(name, "org.qemu.guest_agent.0", 22) == 0) {
                fclose(f);
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(d);
                return open(path, O_RDWR | O_NOCTTY);
            }
            fclose(f);
        }
        if (d) closedir(d);
        usleep(100000);
    }
    return -1;
}

static void reply(int fd, const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void handle(int fd, const char *line) {
    char out[128];
    if (strstr(line, "\"guest-sync\"")) {
        const char *id = strstr(line, "\"id\"");
        long long v = 0;
        if (id && (id = strchr(id, ':'))) v = atoll(id + 1);
        snprintf(out, sizeof out, "{\"return\": %lld}\n", v);
        reply(fd, out);
    } else if (strstr(line, "\"guest-ping\"")) {
        reply(fd, "{\"return\": {}}\n");
    } else if (strstr(line, "\"guest-shutdown\"")) {
        printf("TANDEM-GUEST-AGENT-SHUTDOWN\n");
        fflush(stdout);
        sync();
        reboot(RB_POWER_OFF);
    } else if (line[0] != '\0') {
        reply(fd, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"not supported by the test guest's agent\"}}\n");
    }
}

int main(void) {
    int fd = open_port();
    if (fd < 0) return 0;
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, buf + len, sizeof buf - 1 - len);
        if (r <= 0) {
            /* No host connected yet (or it went away): try again shortly. */
            usleep(100000);
            continue;
        }
        len += (size_t)r;
        buf[len] = '\0';
        char *start = buf, *nl;
        while ((nl = strchr(start, '\n'))) {
            *nl = '\0';
            handle(fd, start);
            start = nl + 1;
        }
        len = strlen(start);
        memmove(buf, start, len + 1);
        if (len == sizeof buf - 1) len = 0; /* an overlong line is dropped */
    }
}
