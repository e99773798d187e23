/* A fake OpenAI-compatible upstream in C for `python -m bench.cores`: the same bytes as
 * bench/harness/mock.py's back-to-back streams (interval 0, size 4), at a fraction of its
 * CPU, so that the two cores of the bench machine go to lean rather than to the harness.
 *
 *   cc -O2 -o cores_upstream bench/cores_upstream.c && ./cores_upstream PORT
 *
 * One thread, epoll, non-blocking sockets, HTTP/1.1 keep-alive. GET answers 200 "ok" (the
 * bench's readiness probe). POST answers an SSE stream of N content chunks, N from the body:
 * `[bench chunks=N ...]` (a scene run's message) or `"bench_chunks":N` (the OpenAI
 * endpoint), then the finish chunk, the usage chunk when the body asks for it
 * (`"include_usage":true`, as lean does) and `data: [DONE]`. Unlike the Python mock the
 * body has a Content-Length (it is built once per N and written in 64 KB pieces), which
 * lean's upstream client reads the same way. Requests are at most 64 KB.
 */
#define _GNU_SOURCE  /* accept4 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define REQUEST_MAX 65536
#define WRITE_MAX 65536
#define CACHED 8

#define HEAD "{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock-model\","
static const char FIRST[] = "data: " HEAD "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"lore\"},\"finish_reason\":null}]}\n\n";
static const char MIDDLE[] = "data: " HEAD "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lore\"},\"finish_reason\":null}]}\n\n";
static const char FINISH[] = "data: " HEAD "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
static const char USAGE[] = "data: " HEAD "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\n";
static const char DONE[] = "data: [DONE]\n\n";
static const char OK[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";

struct response { long chunks; int usage; char *bytes; size_t len; };
static struct response cache[CACHED];

struct conn {
    int fd;
    char in[REQUEST_MAX];
    size_t got;
    const char *out;  /* what is left to write of the current response */
    size_t left;
};

static const struct response *stream(long chunks, int usage) {
    for (int i = 0; i < CACHED; i++)
        if (cache[i].bytes && cache[i].chunks == chunks && cache[i].usage == usage) return &cache[i];
    size_t body = (chunks > 0 ? sizeof FIRST - 1 + (chunks - 1) * (sizeof MIDDLE - 1) : 0)
                  + sizeof FINISH - 1 + (usage ? sizeof USAGE - 1 : 0) + sizeof DONE - 1;
    char head[256];
    int n = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\nContent-Length: %zu\r\n\r\n", body);
    char *bytes = malloc(n + body), *p = bytes + n;
    memcpy(bytes, head, n);
    for (long i = 0; i < chunks; i++) {
        const char *c = i ? MIDDLE : FIRST;
        size_t len = i ? sizeof MIDDLE - 1 : sizeof FIRST - 1;
        memcpy(p, c, len);
        p += len;
    }
    memcpy(p, FINISH, sizeof FINISH - 1), p += sizeof FINISH - 1;
    if (usage) memcpy(p, USAGE, sizeof USAGE - 1), p += sizeof USAGE - 1;
    memcpy(p, DONE, sizeof DONE - 1);
    static int next;
    struct response *r = &cache[next++ % CACHED];
    free(r->bytes);
    *r = (struct response){chunks, usage, bytes, n + body};
    return r;
}

static long number_after(const char *body, const char *key) {
    const char *at = strstr(body, key);
    return at ? atol(at + strlen(key)) : -1;
}

/* A whole request in c->in: set the response to write; 0 when more bytes are needed. */
static int answer(struct conn *c) {
    c->in[c->got] = 0;
    char *end = strstr(c->in, "\r\n\r\n");
    if (!end) return 0;
    size_t length = 0;
    for (char *h = c->in; h && h < end; h = strstr(h, "\r\n"), h = h ? h + 2 : NULL)
        if (strncasecmp(h, "content-length:", 15) == 0) length = strtoul(h + 15, NULL, 10);
    size_t whole = (size_t)(end + 4 - c->in) + length;
    if (c->got < whole) return 0;
    if (strncmp(c->in, "GET ", 4) == 0) {
        c->out = OK, c->left = sizeof OK - 1;
    } else {
        long chunks = number_after(end, "chunks=");
        if (chunks < 0) chunks = number_after(end, "\"bench_chunks\":");
        const struct response *r = stream(chunks < 0 ? 200 : chunks,
                                          strstr(end, "\"include_usage\":true") != NULL);
        c->out = r->bytes, c->left = r->len;
    }
    memmove(c->in, c->in + whole, c->got - whole);  /* a pipelined next request stays */
    c->got -= whole;
    return 1;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

int main(int argc, char **argv) {
    if (argc != 2) return fprintf(stderr, "usage: %s PORT\n", argv[0]), 2;
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 1024)) return perror("bind"), 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, events[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {  /* the listener */
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            int alive = 1;
            if (!c->left && (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                ssize_t r = read(c->fd, c->in + c->got, REQUEST_MAX - 1 - c->got);
                if (r <= 0 && !(r < 0 && errno == EAGAIN)) alive = 0;
                else if (r > 0) c->got += r;
                if (alive && c->got >= REQUEST_MAX - 1 && !answer(c)) alive = 0;
                else if (alive) answer(c);
            }
            while (alive && c->left) {
                ssize_t w = write(c->fd, c->out, c->left < WRITE_MAX ? c->left : WRITE_MAX);
                if (w < 0 && errno == EAGAIN) break;
                if (w <= 0) { alive = 0; break; }
                c->out += w, c->left -= w;
                if (!c->left) answer(c);  /* a pipelined request already read */
            }
            if (!alive) { drop(ep, c); continue; }
            struct epoll_event e = {.events = c->left ? EPOLLOUT : EPOLLIN | EPOLLRDHUP, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
        }
    }
}
