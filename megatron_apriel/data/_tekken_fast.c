/* Compiled Tekken pre-tokenizer + BPE for the ASCII parts of a text, byte-identical to tiktoken.
 *
 * Why this exists: with the Tekken split pattern (Megatron-LM's "v2") tiktoken spends most of its
 * time in fancy-regex, because the pattern's `\s+(?!\S)` lookahead forces the whole alternation into
 * fancy-regex's backtracking VM. Python-level splitters (regex, pcre2) and PCRE2-JIT tokenizers were
 * measured slower than tiktoken itself, so the split is written out here by hand for ASCII, where
 * the pattern reduces to a few character classes (see split_ascii). Everything that is not ASCII is
 * still tokenized by tiktoken: a text is cut at "safe" boundaries (a piece of the pattern never
 * crosses them, whatever the surrounding characters) and the regions holding non-ASCII characters
 * are handed to tiktoken's encode_ordinary, so the concatenation equals tiktoken on the whole text
 * (except runs of blanks, whose one piece is known without the regex: see blank_run).
 * The BPE is tiktoken's byte_pair_merge (lowest-rank adjacent pair first, leftmost on ties; a linear
 * scan for short pieces, a heap for long ones, as tiktoken does), over an open-addressing table
 * built from tiktoken's own mergeable ranks.
 *
 * Only the exact pattern string below is implemented; the Python side uses tiktoken for any other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char TEKKEN_PATTERN[] =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

#define NO_RANK UINT32_MAX

/* ASCII character classes of the pattern. \s is Unicode White_Space: 0x09-0x0D and 0x20 only
 * (0x1C-0x1F are not, unlike Python's str.isspace). PUNCT is everything else that is neither a
 * letter nor a digit, control characters included. */
enum { C_UPPER = 1, C_LOWER = 2, C_DIGIT = 4, C_WS = 8, C_NL = 16, C_PUNCT = 32 };
static unsigned char CLS[128];

static void init_classes(void) {
    for (int c = 0; c < 128; c++) {
        unsigned char k;
        if (c >= 'A' && c <= 'Z') k = C_UPPER;
        else if (c >= 'a' && c <= 'z') k = C_LOWER;
        else if (c >= '0' && c <= '9') k = C_DIGIT;
        else if (c == ' ' || (c >= 0x09 && c <= 0x0D)) k = C_WS | ((c == '\r' || c == '\n') ? C_NL : 0);
        else k = C_PUNCT;
        CLS[c] = k;
    }
}

#define IS_LETTER(c) (CLS[c] & (C_UPPER | C_LOWER))
/* the optional one-character prefix of the letter alternatives: not \r, \n, letter or digit */
#define IS_PREFIX(c) (CLS[c] & C_PUNCT || (CLS[c] & (C_WS | C_NL)) == C_WS)

typedef struct {
    uint64_t head; /* the key's first 8 bytes, zero-padded: most keys compare without the arena */
    uint32_t hash;
    uint32_t len;
    uint32_t off;
    uint32_t rank; /* NO_RANK: empty slot */
} Slot;

typedef struct {
    int32_t *data;
    size_t len, cap;
} OutBuf;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint32_t mask;
    unsigned char *arena;
    uint32_t *pair_rank; /* 65536 entries: two-byte keys, the first BPE pass, without hashing */
    PyObject *fallback; /* tiktoken's encode_ordinary, for the non-ASCII regions */
    Py_ssize_t n_tokens;
} EncoderObject;

static inline uint64_t mix(uint64_t h) {
    h ^= h >> 32;
    h *= 0xd6e8feb86659fd93ULL;
    h ^= h >> 32;
    return h;
}

static inline uint32_t hash_bytes(const unsigned char *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)n * 0xff51afd7ed558ccdULL);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = mix(h ^ v);
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        memcpy(&v, p, n);
        h = mix(h ^ v ^ 0xa5a5a5a5ULL);
    }
    return (uint32_t)mix(h);
}

static inline uint64_t head_of(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    memcpy(&v, p, n < 8 ? n : 8);
    return v;
}

static inline uint32_t lookup_hashed(const EncoderObject *e, const unsigned char *p, size_t n, uint32_t h) {
    uint64_t head = head_of(p, n);
    uint32_t i = h & e->mask;
    for (;;) {
        const Slot *s = &e->slots[i];
        if (s->rank == NO_RANK) return NO_RANK;
        if (s->hash == h && s->len == n && s->head == head &&
            (n <= 8 || memcmp(e->arena + s->off + 8, p + 8, n - 8) == 0))
            return s->rank;
        i = (i + 1) & e->mask;
    }
}

static inline uint32_t lookup(const EncoderObject *e, const unsigned char *p, size_t n) {
    return lookup_hashed(e, p, n, hash_bytes(p, n));
}

/* Pieces that are not tokens repeat (identifiers, words): their BPE result is kept in a small
 * direct-mapped cache. One per call, not per encoder, because calls run without the GIL. */
#define CACHE_SLOTS 4096
#define CACHE_BYTES 24
#define CACHE_IDS 12
typedef struct {
    uint32_t hash;
    uint8_t len; /* 0: empty */
    uint8_t n_ids;
    unsigned char bytes[CACHE_BYTES];
    int32_t ids[CACHE_IDS];
} CacheEntry;

static int out_reserve(OutBuf *o, size_t extra) {
    if (o->len + extra <= o->cap) return 0;
    size_t cap = o->cap ? o->cap : 1024;
    while (cap < o->len + extra) cap *= 2;
    int32_t *d = realloc(o->data, cap * sizeof(int32_t));
    if (!d) return -1;
    o->data = d;
    o->cap = cap;
    return 0;
}

/* Pieces of at least this many bytes go to bpe_large. The linear scan below does O(n) work per
 * merge, O(n^2) in all: 2.0 s for one 100,000-byte run of 'x' (base64 blobs, padded tables and
 * minified code are single pieces that long). Built with -DLARGE_PIECE=20..400 and timed on random
 * lowercase words, the two were within noise up to 200 bytes and the heap 1.4x faster at 250;
 * tiktoken switches at 100 too. */
#ifndef LARGE_PIECE
#define LARGE_PIECE 100
#endif

/* tiktoken's _byte_pair_merge_large: the same merges in the same order as bpe() (lowest rank first,
 * leftmost on ties: the heap key is rank << 32 | start), in O(n log n). Parts form a linked list
 * over byte positions: for a part starting at i, end[i] is its end, next_end[i] the end of the part
 * after it, next_rank[i] the rank of the two joined (NO_RANK: not a token) and prev[i] the start of
 * the part before it. A heap entry whose rank no longer equals next_rank[start] is stale: ranks are
 * unique per byte string, and a part's right neighbour only grows. Positions are 32-bit, so a piece
 * must be shorter than 4 GiB (an error otherwise). */
typedef struct {
    uint32_t prev, end, next_end, next_rank;
} LargePart;

static inline void heap_sift_down(uint64_t *h, size_t n, size_t i) {
    uint64_t v = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

static inline void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (h[parent] <= v) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = v;
}

/* the pair (part at start, part ending at next_end) becomes a candidate if it is a token */
static inline void large_candidate(const EncoderObject *e, const unsigned char *piece, size_t n, LargePart *s,
                                   uint64_t *heap, size_t *heap_n, uint32_t start, uint32_t next_end) {
    s[start].next_end = next_end;
    s[start].next_rank = NO_RANK;
    if (next_end <= n) {
        uint32_t r = lookup(e, piece + start, next_end - start);
        if (r != NO_RANK) {
            s[start].next_rank = r;
            heap_push(heap, heap_n, (uint64_t)r << 32 | start);
        }
    }
}

static int bpe_large(const EncoderObject *e, const unsigned char *piece, size_t n, OutBuf *out, int32_t offset) {
    if (n >= UINT32_MAX) return -1;
    LargePart *s = malloc(n * sizeof(LargePart));
    /* fewer than n initial pairs, then each merge pops one entry and pushes at most two, and there
     * are fewer than n merges: the heap never holds 2n entries */
    uint64_t *heap = malloc(2 * n * sizeof(uint64_t));
    if (!s || !heap) {
        free(s);
        free(heap);
        return -1;
    }
    size_t heap_n = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = i + 1 < n ? e->pair_rank[piece[i] | (uint32_t)piece[i + 1] << 8] : NO_RANK;
        s[i] = (LargePart){i == 0 ? UINT32_MAX : (uint32_t)(i - 1), (uint32_t)(i + 1), (uint32_t)(i + 2), r};
        if (r != NO_RANK) heap[heap_n++] = (uint64_t)r << 32 | i;
    }
    for (size_t i = heap_n / 2; i-- > 0;) heap_sift_down(heap, heap_n, i);
    while (heap_n) {
        uint64_t top = heap[0];
        heap[0] = heap[--heap_n];
        heap_sift_down(heap, heap_n, 0);
        uint32_t left = (uint32_t)top, rank = (uint32_t)(top >> 32);
        if (s[left].next_rank != rank) continue; /* stale */
        uint32_t right = s[left].end, right_end = s[left].next_end;
        uint32_t right_next_end = s[right].next_end;
        s[left].end = right_end;
        large_candidate(e, piece, n, s, heap, &heap_n, left, right_next_end);
        if (right_end < n) s[right_end].prev = left;
        if (left > 0) large_candidate(e, piece, n, s, heap, &heap_n, s[left].prev, right_end);
        s[right].next_rank = NO_RANK;
    }
    int rc = 0;
    for (size_t i = 0; i < n; i = s[i].end) {
        if (out_reserve(out, 1)) {
            rc = -1;
            break;
        }
        out->data[out->len++] = (int32_t)lookup(e, piece + i, s[i].end - i) + offset;
    }
    free(s);
    free(heap);
    return rc;
}

/* tiktoken's _byte_pair_merge + byte_pair_encode for a piece that is not itself a token. */
static int bpe(const EncoderObject *e, const unsigned char *piece, size_t n, OutBuf *out, int32_t offset) {
    if (n >= LARGE_PIECE) return bpe_large(e, piece, n, out, offset);
    size_t stack_start[129];
    uint32_t stack_rank[129];
    size_t *start = stack_start;
    uint32_t *rank = stack_rank;
    if (n + 1 > 129) {
        start = malloc((n + 1) * sizeof(size_t));
        rank = malloc((n + 1) * sizeof(uint32_t));
        if (!start || !rank) {
            free(start);
            free(rank);
            return -1;
        }
    }
    uint32_t min_rank = NO_RANK;
    size_t min_i = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        uint32_t r = e->pair_rank[piece[i] | (uint32_t)piece[i + 1] << 8];
        if (r < min_rank) {
            min_rank = r;
            min_i = i;
        }
        start[i] = i;
        rank[i] = r;
    }
    start[n - 1] = n - 1;
    rank[n - 1] = NO_RANK;
    start[n] = n;
    rank[n] = NO_RANK;
    size_t count = n + 1;
#define GET_RANK(k) ((k) + 3 < count ? lookup(e, piece + start[k], start[(k) + 3] - start[k]) : NO_RANK)
    while (min_rank != NO_RANK) {
        size_t i = min_i;
        if (i > 0) rank[i - 1] = GET_RANK(i - 1);
        rank[i] = GET_RANK(i);
        memmove(start + i + 1, start + i + 2, (count - i - 2) * sizeof(size_t));
        memmove(rank + i + 1, rank + i + 2, (count - i - 2) * sizeof(uint32_t));
        count--;
        min_rank = NO_RANK;
        for (size_t k = 0; k + 1 < count; k++) {
            if (rank[k] < min_rank) {
                min_rank = rank[k];
                min_i = k;
            }
        }
    }
#undef GET_RANK
    int rc = out_reserve(out, count - 1);
    if (rc == 0) {
        for (size_t k = 0; k + 1 < count; k++)
            out->data[out->len++] = (int32_t)lookup(e, piece + start[k], start[k + 1] - start[k]) + offset;
    }
    if (start != stack_start) {
        free(start);
        free(rank);
    }
    return rc;
}

static inline int emit_piece(const EncoderObject *e, const unsigned char *p, size_t n, OutBuf *out, int32_t offset,
                             CacheEntry *cache) {
    uint32_t h = hash_bytes(p, n);
    uint32_t r = lookup_hashed(e, p, n, h);
    if (r != NO_RANK) {
        if (out_reserve(out, 1)) return -1;
        out->data[out->len++] = (int32_t)r + offset;
        return 0;
    }
    if (n > CACHE_BYTES) return bpe(e, p, n, out, offset);
    CacheEntry *c = &cache[h & (CACHE_SLOTS - 1)];
    if (c->len == n && c->hash == h && memcmp(c->bytes, p, n) == 0) {
        if (out_reserve(out, c->n_ids)) return -1;
        memcpy(out->data + out->len, c->ids, c->n_ids * sizeof(int32_t));
        out->len += c->n_ids;
        return 0;
    }
    size_t before = out->len;
    if (bpe(e, p, n, out, offset)) return -1;
    size_t n_ids = out->len - before;
    if (n_ids <= CACHE_IDS) {
        c->hash = h;
        c->len = (uint8_t)n;
        c->n_ids = (uint8_t)n_ids;
        memcpy(c->bytes, p, n);
        memcpy(c->ids, out->data + before, n_ids * sizeof(int32_t));
    }
    return 0;
}

/* The Tekken pattern on ASCII, leftmost-first alternation with backtracking, worked out per
 * alternative (tests compare it with tiktoken on fuzzed and real text):
 *   1|2  [^\r\n L N]? [Lu]* [Ll]+  |  [^\r\n L N]? [Lu]+ [Ll]*  -> prefix? + upper run + lower run
 *   3    \p{N}                                                  -> one digit
 *   4    ' '? [^\s L N]+ [\r\n/]*                               -> space? + punct run + [\r\n/] run
 *   5    \s*[\r\n]+                 -> a whitespace run up to and including its last \r or \n
 *   6|7  \s+(?!\S) | \s+            -> the run if it ends the text, else the run minus its last
 *                                      character when that leaves one, else one character */
static int split_ascii(const EncoderObject *e, const unsigned char *s, size_t n, OutBuf *out, int32_t offset,
                       CacheEntry *cache) {
    size_t p = 0;
    while (p < n) {
        unsigned char c = s[p];
        size_t end;
        if (IS_LETTER(c) || (IS_PREFIX(c) && p + 1 < n && IS_LETTER(s[p + 1]))) {
            size_t q = IS_LETTER(c) ? p : p + 1;
            while (q < n && CLS[s[q]] & C_UPPER) q++;
            while (q < n && CLS[s[q]] & C_LOWER) q++;
            end = q;
        } else if (CLS[c] & C_DIGIT) {
            end = p + 1;
        } else if ((CLS[c] & C_PUNCT) || (c == ' ' && p + 1 < n && CLS[s[p + 1]] & C_PUNCT)) {
            size_t q = (c == ' ') ? p + 1 : p;
            while (q < n && CLS[s[q]] & C_PUNCT) q++;
            while (q < n && (s[q] == '\r' || s[q] == '\n' || s[q] == '/')) q++;
            end = q;
        } else { /* whitespace */
            size_t r = p, last_nl = SIZE_MAX;
            while (r < n && CLS[s[r]] & C_WS) {
                if (CLS[s[r]] & C_NL) last_nl = r;
                r++;
            }
            if (last_nl != SIZE_MAX) end = last_nl + 1;
            else if (r == n) end = n;
            else if (r - p >= 2) end = r - 1;
            else end = p + 1;
        }
        if (emit_piece(e, s + p, end - p, out, offset, cache)) return -1;
        p = end;
    }
    return 0;
}

/* A piece boundary at i whatever the rest of the text is: after a non-whitespace character before
 * a space or tab (no alternative continues a non-whitespace character with a space or tab), or
 * after '\n' before a character that is neither whitespace nor '/' (only [\r\n/]* and whitespace
 * runs continue a '\n'). Both sides must be ASCII: only then is the class known here. */
static inline int safe_boundary(Py_UCS4 a, Py_UCS4 b) {
    if (a >= 128 || b >= 128) return 0;
    if ((b == ' ' || b == '\t') && !(CLS[a] & C_WS)) return 1;
    if (a == '\n' && !(CLS[b] & C_WS) && b != '/') return 1;
    return 0;
}

static int encode_fallback(EncoderObject *e, PyObject *text, Py_ssize_t a, Py_ssize_t b, OutBuf *out, int32_t offset) {
    PyObject *sub = PyUnicode_Substring(text, a, b);
    if (!sub) return -1;
    PyObject *ids = PyObject_CallOneArg(e->fallback, sub);
    Py_DECREF(sub);
    if (!ids) return -1;
    PyObject *seq = PySequence_Fast(ids, "the fallback encoder must return a sequence of ints");
    Py_DECREF(ids);
    if (!seq) return -1;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    if (out_reserve(out, (size_t)m)) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t k = 0; k < m; k++) {
        long v = PyLong_AsLong(items[k]);
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        out->data[out->len++] = (int32_t)v + offset;
    }
    Py_DECREF(seq);
    return 0;
}

enum { REGION_ASCII = 0, REGION_TIKTOKEN = 1, REGION_PIECE = 2 };

/* One region [a, b) of a non-ASCII str: tiktoken when it holds non-ASCII, split_ascii on a one-byte
 * copy of its characters when not, and straight to the BPE when it is known to be one piece. */
static int encode_region(EncoderObject *e, PyObject *text, Py_ssize_t a, Py_ssize_t b, int how, OutBuf *out,
                         int32_t offset, CacheEntry *cache) {
    if (how == REGION_TIKTOKEN) return encode_fallback(e, text, a, b, out, offset);
    if (how == REGION_PIECE) {
        PyObject *sub = PyUnicode_Substring(text, a, b);
        if (!sub) return -1;
        Py_ssize_t len;
        const char *utf8 = PyUnicode_AsUTF8AndSize(sub, &len);
        int rc = utf8 ? emit_piece(e, (const unsigned char *)utf8, (size_t)len, out, offset, cache) : -1;
        Py_DECREF(sub);
        if (rc && !PyErr_Occurred()) PyErr_NoMemory();
        return rc;
    }
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    size_t len = (size_t)(b - a);
    unsigned char *ascii = malloc(len ? len : 1);
    if (!ascii) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = a; k < b; k++) ascii[k - a] = (unsigned char)PyUnicode_READ(kind, data, k);
    int rc = split_ascii(e, ascii, len, out, offset, cache);
    free(ascii);
    if (rc) PyErr_NoMemory();
    return rc;
}

/* \s of the pattern: Unicode White_Space */
static inline int is_space(Py_UCS4 c) {
    if (c < 128) return CLS[c] & C_WS;
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* whitespace other than '\r' and '\n' */
static inline int is_blank(Py_UCS4 c) { return c != '\r' && c != '\n' && is_space(c); }

/* A run of blanks [a, b) in text that is not all ASCII. tiktoken's regex engine gives up (a panic:
 * its backtracking limit) on a run of about a million blanks, so such a run must not reach it. The
 * run starts a piece when it follows a non-whitespace character (no alternative continues one
 * with whitespace other than [\r\n/]*), or follows the last '\r'/'\n' of a whitespace run (only
 * [\r\n/]* and \s*[\r\n]+ continue those, and both stop at a blank). Started so and followed by
 * a non-whitespace character, [a, b - 1) is one piece (\s+(?!\S) backtracks by one) and b - 1 a
 * boundary; at the end of the text [a, b) is one piece. Returns whether a is a boundary (a > 0);
 * *b_out = b, and [*piece_a, *piece_b) is the run's one piece, or empty. */
static int blank_run(int kind, const void *data, Py_ssize_t n, Py_ssize_t a, Py_ssize_t *b_out, Py_ssize_t *piece_a,
                     Py_ssize_t *piece_b) {
    Py_ssize_t b = a;
    while (b < n && is_blank(PyUnicode_READ(kind, data, b))) b++;
    *b_out = b;
    *piece_a = *piece_b = -1;
    Py_UCS4 before = a > 0 ? PyUnicode_READ(kind, data, a - 1) : 0;
    int ends_run = b == n || !is_space(PyUnicode_READ(kind, data, b));
    int starts = a == 0 || !is_space(before) || ((before == '\r' || before == '\n') && ends_run);
    if (starts && b == n) {
        *piece_a = a;
        *piece_b = n;
    } else if (starts && ends_run && b - a >= 2) {
        *piece_a = a;
        *piece_b = b - 1;
    }
    return starts && a > 0;
}

/* A non-ASCII str (GIL held): cut at safe boundaries into segments; consecutive segments of the same
 * kind (all ASCII, or holding non-ASCII) form one region, encoded by encode_region; a long blank
 * run's one piece is a region of its own. */
static int encode_mixed(EncoderObject *e, PyObject *text, OutBuf *out, int32_t offset, CacheEntry *cache) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t region_start = 0, seg_start = 0;
    Py_ssize_t run_end = 0, piece_a = -1, piece_b = -1; /* the blank run being crossed, and its one piece */
    int region = -1; /* kind of the pending region, -1: none */
    int seg = REGION_ASCII;
    if (n && is_blank(PyUnicode_READ(kind, data, 0))) blank_run(kind, data, n, 0, &run_end, &piece_a, &piece_b);
    for (Py_ssize_t i = 1; i <= n; i++) {
        Py_UCS4 prev = PyUnicode_READ(kind, data, i - 1);
        if (prev >= 128) seg = REGION_TIKTOKEN;
        int boundary = i == n || i == piece_b;
        if (!boundary) {
            Py_UCS4 cur = PyUnicode_READ(kind, data, i);
            if (i >= run_end && is_blank(cur)) boundary = blank_run(kind, data, n, i, &run_end, &piece_a, &piece_b);
            boundary = boundary || safe_boundary(prev, cur);
        }
        if (!boundary) continue;
        /* segment [seg_start, i) is complete */
        if (seg == REGION_TIKTOKEN && seg_start == piece_a && i == piece_b) seg = REGION_PIECE;
        if (region >= 0 && (region != seg || seg == REGION_PIECE)) {
            if (encode_region(e, text, region_start, seg_start, region, out, offset, cache)) return -1;
            region = -1;
        }
        if (region < 0) {
            region = seg;
            region_start = seg_start;
        }
        seg_start = i;
        seg = REGION_ASCII;
    }
    if (region >= 0) return encode_region(e, text, region_start, n, region, out, offset, cache);
    return 0;
}

static int encode_one(EncoderObject *e, PyObject *text, OutBuf *out, int32_t offset, CacheEntry *cache) {
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
    if (PyUnicode_IS_ASCII(text)) {
        const unsigned char *s = PyUnicode_DATA(text);
        size_t n = (size_t)PyUnicode_GET_LENGTH(text);
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = split_ascii(e, s, n, out, offset, cache);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_NoMemory();
        return rc;
    }
    return encode_mixed(e, text, out, offset, cache);
}

/* ------------------------------------------------------------------ the Python type */

static void Encoder_dealloc(EncoderObject *self) {
    free(self->slots);
    free(self->arena);
    free(self->pair_rank);
    Py_XDECREF(self->fallback);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Encoder_init(EncoderObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ranks", "fallback", NULL};
    PyObject *ranks, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O", kwlist, &PyDict_Type, &ranks, &fallback)) return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable (tiktoken's encode_ordinary)");
        return -1;
    }
    Py_ssize_t n = PyDict_Size(ranks);
    size_t total = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(ranks, &pos, &key, &value)) {
        if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) == 0) {
            PyErr_SetString(PyExc_TypeError, "ranks must map non-empty bytes to int");
            return -1;
        }
        total += (size_t)PyBytes_GET_SIZE(key);
    }
    uint32_t size = 1024;
    while (size < 2 * (uint32_t)n + 1) size *= 2;
    free(self->slots);
    free(self->arena);
    free(self->pair_rank);
    self->slots = malloc(size * sizeof(Slot));
    self->arena = malloc(total ? total : 1);
    self->pair_rank = malloc(65536 * sizeof(uint32_t));
    if (!self->slots || !self->arena || !self->pair_rank) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < size; i++) self->slots[i].rank = NO_RANK;
    self->mask = size - 1;
    size_t off = 0;
    pos = 0;
    while (PyDict_Next(ranks, &pos, &key, &value)) {
        long r = PyLong_AsLong(value);
        if ((r == -1 && PyErr_Occurred()) || r < 0 || r >= INT32_MAX) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "ranks must be in [0, 2**31-1)");
            return -1;
        }
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(key);
        size_t len = (size_t)PyBytes_GET_SIZE(key);
        memcpy(self->arena + off, b, len);
        uint32_t h = hash_bytes(b, len);
        uint32_t i = h & self->mask;
        while (self->slots[i].rank != NO_RANK) i = (i + 1) & self->mask;
        self->slots[i] = (Slot){head_of(b, len), h, (uint32_t)len, (uint32_t)off, (uint32_t)r};
        off += len;
    }
    for (uint32_t k = 0; k < 65536; k++) {
        unsigned char pair[2] = {(unsigned char)(k & 0xff), (unsigned char)(k >> 8)};
        self->pair_rank[k] = lookup(self, pair, 2);
    }
    for (int c = 0; c < 256; c++) {
        unsigned char b = (unsigned char)c;
        if (lookup(self, &b, 1) == NO_RANK) {
            PyErr_Format(PyExc_ValueError, "ranks lack the single byte 0x%02x: not a byte-level BPE vocabulary", c);
            return -1;
        }
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    self->n_tokens = n;
    return 0;
}

static PyObject *Encoder_encode(EncoderObject *self, PyObject *args) {
    PyObject *text;
    if (!PyArg_ParseTuple(args, "O", &text)) return NULL;
    OutBuf out = {0};
    CacheEntry *cache = calloc(CACHE_SLOTS, sizeof(CacheEntry));
    if (!cache) return PyErr_NoMemory();
    int rc = encode_one(self, text, &out, 0, cache);
    free(cache);
    if (rc) {
        free(out.data);
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)out.len);
    for (size_t k = 0; list && k < out.len; k++) {
        PyObject *v = PyLong_FromLong(out.data[k]);
        if (!v) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, v);
    }
    free(out.data);
    return list;
}

static PyObject *Encoder_encode_batch(EncoderObject *self, PyObject *args) {
    PyObject *texts;
    int offset = 0;
    if (!PyArg_ParseTuple(args, "O|i", &texts, &offset)) return NULL;
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence of str");
    if (!seq) return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    int64_t *lengths = malloc((m ? m : 1) * sizeof(int64_t));
    CacheEntry *cache = calloc(CACHE_SLOTS, sizeof(CacheEntry));
    OutBuf out = {0};
    PyObject *result = NULL;
    if (!lengths || !cache) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        size_t before = out.len;
        if (encode_one(self, PySequence_Fast_GET_ITEM(seq, i), &out, offset, cache)) goto done;
        lengths[i] = (int64_t)(out.len - before);
    }
    PyObject *ids = PyByteArray_FromStringAndSize((const char *)out.data, (Py_ssize_t)(out.len * sizeof(int32_t)));
    PyObject *lens = ids ? PyByteArray_FromStringAndSize((const char *)lengths, m * (Py_ssize_t)sizeof(int64_t)) : NULL;
    if (ids && lens) result = PyTuple_Pack(2, ids, lens);
    Py_XDECREF(ids);
    Py_XDECREF(lens);
done:
    free(lengths);
    free(cache);
    free(out.data);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_VARARGS, "encode(text) -> list of ranks (tiktoken's encode_ordinary)"},
    {"encode_batch", (PyCFunction)Encoder_encode_batch, METH_VARARGS,
     "encode_batch(texts, offset=0) -> (bytearray of int32 ids + offset, bytearray of int64 lengths)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Encoder_len(EncoderObject *self, void *closure) { return PyLong_FromSsize_t(self->n_tokens); }

static PyGetSetDef Encoder_getset[] = {
    {"n_tokens", (getter)Encoder_len, NULL, "number of ranks in the table", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "megatron_apriel.data._tekken_fast.Encoder",
    .tp_basicsize = sizeof(EncoderObject),
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(ranks: dict[bytes, int], fallback: str -> list[int]): the Tekken split + BPE",
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
    .tp_init = (initproc)Encoder_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tekken_fast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__tekken_fast(void) {
    init_classes();
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddStringConstant(m, "PATTERN", TEKKEN_PATTERN) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
