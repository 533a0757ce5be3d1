/* Optional speed-ups in C: three steps of the sanitizer (upstream_ops.sanitize), the keys of the
   key/value pairs (pair_matches, KeyModes), the values of the secret keys (redact_values) and the
   token rules' literals (token_anchors, below); an event made from its fields (event_from_fields)
   and append_upstream_error's common case (Appender); the key of an event's row in the SQLite sink
   (event_key); and the record and request ids (uuid7_hex, ordered_uuid7_hex).

   The pure-Python pass (Sanitizer._secret_separators) finds every key/value separator by
   splitting the reversed text with the patterns of _sanitize_rules._REVERSED_PAIRS, and looks up
   the mode of each "separator and key" it splits off. In CPython 3.11 each regex match costs about
   1,900 instructions of set-up, and quoted JSON has a separator every thirty characters: that is
   most of the cost of sanitizing it. This module reads the same keys with a loop over the text,
   and must agree with those patterns exactly: tests/test_sanitize_speedups.py checks it against
   them on generated text.

   A separator's key never contains a separator of its own kind, so each separator is read on its
   own: from its left, backwards, as the reversed patterns read it.

   Built when a C compiler is there (setup.py marks it optional); without it the Python passes
   run. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <ctype.h>
#include <string.h>
#include <structmember.h>

#define KEY_MAX_CHARS 128 /* _sanitize_rules._KEY_MAX_CHARS */
#define QUOTE_BACKSLASHES 8

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t size;
} Text;

static inline Py_UCS4
at(const Text *t, Py_ssize_t i)
{
    return PyUnicode_READ(t->kind, t->data, i);
}

/* _KEY_CHARS: A-Za-z0-9_.%[]- */
static inline int
is_key_char(Py_UCS4 c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '.' || c == '%' || c == '[' || c == ']' || c == '-';
}

/* A character of a quoted key: [^"'\\\r\n:=] */
static inline int
is_quoted_char(Py_UCS4 c)
{
    return !(c == '"' || c == '\'' || c == '\\' || c == '\r' || c == '\n' || c == ':' || c == '=');
}

/* _ENCODED_STOP read backwards from i: "%3D", "%3d", "%3A", "%3a" or "%26" ends at i. */
static inline int
is_encoded_stop(const Text *t, Py_ssize_t i)
{
    if (i < 2 || at(t, i - 2) != '%') {
        return 0;
    }
    Py_UCS4 c = at(t, i), before = at(t, i - 1);
    if (c == 'D' || c == 'd' || c == 'A' || c == 'a') {
        return before == '3';
    }
    return c == '6' && before == '2';
}

static inline int
is_stop_start(Py_UCS4 c)
{
    return c == 'D' || c == 'd' || c == 'A' || c == 'a' || c == '6';
}

/* _ENCODED_QUOTED_KEY_CHAR */
static inline int
is_encoded_quoted_char(const Text *t, Py_ssize_t i)
{
    Py_UCS4 c = at(t, i);
    if (is_stop_start(c)) {
        return !is_encoded_stop(t, i);
    }
    return is_quoted_char(c);
}

/* _reversed_key(...) read from i leftwards; the index where the key starts, or -1 for none. */
static Py_ssize_t
read_key(const Text *t, Py_ssize_t i, int encoded)
{
    while (i >= 0 && (at(t, i) == ' ' || at(t, i) == '\t')) { /* [ \t]*+ */
        i--;
    }
    if (i < 0) {
        return -1;
    }
    Py_UCS4 c = at(t, i);
    if (c == '"' || c == '\'') { /* "key", \"key\" or 'key' */
        Py_ssize_t n;
        i--;
        if (c == '"') {
            for (n = 0; n < QUOTE_BACKSLASHES && i >= 0 && at(t, i) == '\\'; n++) {
                i--;
            }
        }
        for (n = 0; n < KEY_MAX_CHARS && i >= 0; n++, i--) {
            if (encoded ? !is_encoded_quoted_char(t, i) : !is_quoted_char(at(t, i))) {
                break;
            }
        }
        if (n == 0 || i < 0 || at(t, i) != c) {
            return -1;
        }
        i--;
        if (c == '"') {
            for (n = 0; n < QUOTE_BACKSLASHES && i >= 0 && at(t, i) == '\\'; n++) {
                i--;
            }
        }
        return i + 1;
    }
    if (!encoded) { /* [KEY]{1,128}+(?![KEY]) */
        Py_ssize_t n;
        for (n = 0; n < KEY_MAX_CHARS && i >= 0 && is_key_char(at(t, i)); n++) {
            i--;
        }
        if (n == 0 || (i >= 0 && is_key_char(at(t, i)))) {
            return -1;
        }
        return i + 1;
    }
    /* _ENCODED_BARE_KEY: key characters back to an encoded separator or "&", unbounded */
    if (!is_key_char(c) || is_encoded_stop(t, i)) {
        return -1;
    }
    while (i >= 0 && is_key_char(at(t, i)) &&
           !(is_stop_start(at(t, i)) && is_encoded_stop(t, i))) {
        i--;
    }
    return i + 1;
}

/* The separator and key from start to end (inclusive), reversed: what the reversed pattern
   matched. */
static PyObject *
reversed_slice(const Text *t, Py_ssize_t start, Py_ssize_t end)
{
    Py_UCS4 max_char = 0;
    for (Py_ssize_t i = start; i <= end; i++) {
        Py_UCS4 c = at(t, i);
        if (c > max_char) {
            max_char = c;
        }
    }
    Py_ssize_t length = end - start + 1;
    PyObject *out = PyUnicode_New(length, max_char);
    if (out == NULL) {
        return NULL;
    }
    int kind = PyUnicode_KIND(out);
    void *data = PyUnicode_DATA(out);
    for (Py_ssize_t k = 0; k < length; k++) {
        PyUnicode_WRITE(kind, data, k, at(t, end - k));
    }
    return out;
}

/* Each separator at i: where its value starts (the position after it), and where the reversed match
   ends (its last character in the text). 0 when the character at i starts no separator. */
static inline int
separator_at(const Text *t, Py_ssize_t i, Py_ssize_t *value_start, Py_ssize_t *match_end,
             int *encoded)
{
    Py_UCS4 c = at(t, i);
    if (c == '=') {
        *value_start = i + 1;
        *match_end = i;
        *encoded = 0;
        return 1;
    }
    if (c == ':') { /* (?<!//:): not the colon of "https://" */
        if (i + 2 < t->size && at(t, i + 1) == '/' && at(t, i + 2) == '/') {
            return 0;
        }
        *value_start = i + 1;
        *match_end = i;
        *encoded = 0;
        return 1;
    }
    if (c == '%' && i + 2 < t->size && at(t, i + 1) == '3') { /* %3D, %3A */
        Py_UCS4 letter = at(t, i + 2);
        if (letter == 'D' || letter == 'd' || letter == 'A' || letter == 'a') {
            *value_start = i + 3;
            *match_end = i + 1;
            *encoded = 1;
            return 1;
        }
    }
    return 0;
}

static int
load_text(PyObject *text, Text *t)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.200s", Py_TYPE(text)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text) < 0) { /* a no-op from 3.12 on */
        return -1;
    }
#endif
    t->kind = PyUnicode_KIND(text);
    t->data = PyUnicode_DATA(text);
    t->size = PyUnicode_GET_LENGTH(text);
    return 0;
}

/* Characters a pass stops at: a table each, filled when the module loads. */
static unsigned char separator_chars[256]; /* = : % */
static unsigned char anchor_chars[256];    /* the first characters of the token anchors */
/* The first two characters of the token anchors: anchor_pairs[anchor_chars[first]][second]. */
static unsigned char anchor_pairs[9][256];
/* The anchors (below) with the same first character are together: where each group ends. */
static size_t anchor_group_end[9];

/* The first index from i on whose character is in table, or t->size. Most text is one byte a
   character, read here without PyUnicode_READ's test of the kind at every character. */
static inline Py_ssize_t
next_in(const Text *t, Py_ssize_t i, const unsigned char table[256])
{
    if (t->kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *p = (const Py_UCS1 *)t->data;
        while (i < t->size && !table[p[i]]) {
            i++;
        }
        return i;
    }
    for (; i < t->size; i++) {
        Py_UCS4 c = at(t, i);
        if (c < 256 && table[c]) {
            break;
        }
    }
    return i;
}

/* A separator with a key: where its value starts, and where the reversed match starts and ends. */
typedef struct {
    Py_ssize_t value_start, key_start, match_end;
} Pair;

/* The index of the first separator with a key from i on (filling pair), or t->size. */
static Py_ssize_t
next_pair(const Text *t, Py_ssize_t i, Pair *pair)
{
    for (i = next_in(t, i, separator_chars); i < t->size; i = next_in(t, i + 1, separator_chars)) {
        int encoded;
        if (separator_at(t, i, &pair->value_start, &pair->match_end, &encoded)) {
            pair->key_start = read_key(t, i - 1, encoded);
            if (pair->key_start >= 0) {
                return i;
            }
        }
    }
    return t->size;
}

/* Append (value_start, item) to out, taking the reference to item (which may be NULL after a
   failure); -1 on failure. */
static int
append_pair(PyObject *out, Py_ssize_t value_start, PyObject *item)
{
    PyObject *pair = Py_BuildValue("(nN)", value_start, item);
    if (pair == NULL) {
        return -1;
    }
    int appended = PyList_Append(out, pair);
    Py_DECREF(pair);
    return appended;
}

PyDoc_STRVAR(pair_matches_doc,
             "pair_matches(text, /)\n--\n\n"
             "Every key/value separator with a key, in text order: (where its value starts, the "
             "separator and key reversed), as the patterns of _REVERSED_PAIRS match them in the "
             "reversed text.");

static PyObject *
pair_matches(PyObject *Py_UNUSED(module), PyObject *text)
{
    Text t;
    if (load_text(text, &t) < 0) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    Pair pair;
    for (Py_ssize_t i = next_pair(&t, 0, &pair); i < t.size; i = next_pair(&t, i + 1, &pair)) {
        PyObject *key = reversed_slice(&t, pair.key_start, pair.match_end);
        if (append_pair(out, pair.value_start, key) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* --- Token anchors ----------------------------------------------------------------------------

   Each token rule of _sanitize_rules.TOKEN_RULES is a pass of the regex engine over the whole text
   (about 1 µs a 2 KiB), run when its gate character is there, which for "k", "A", "_" or "x" is
   nearly always. Every match of a rule contains a literal of its own ("sk-", "AKIA", "eyJ" ...):
   one pass here tells which of those literals the text holds, and only their rules run. The bits
   are in the order of TOKEN_ANCHOR_RULES, which sanitize.py checks against TOKEN_RULES. */

static const char *const token_anchor_rules[] = {
    "bearer_or_basic_credential",          /* Bearer, Basic */
    "openai_anthropic_stripe_key",         /* sk-, sk_ */
    "aws_access_key_id_or_google_api_key", /* AKIA, ASIA, AIza */
    "google_oauth_token",                  /* ya29. */
    "github_or_huggingface_token",         /* gh[pousr]_, github_pat_, hf_ */
    "slack_token",                         /* xox[abeoprs]-, xapp- */
    "jwt",                                 /* eyJ */
};
#define TOKEN_ANCHOR_RULES (sizeof(token_anchor_rules) / sizeof(token_anchor_rules[0]))

/* Whether the ASCII literal is at i. */
static inline int
literal_at(const Text *t, Py_ssize_t i, const char *literal)
{
    for (; *literal; literal++, i++) {
        if (i >= t->size || at(t, i) != (Py_UCS4)(unsigned char)*literal) {
            return 0;
        }
    }
    return 1;
}

/* Every literal that a match of a token rule starts with or holds, with the rule's bit (its index
   in token_anchor_rules), those with the same first character together. The anchor pass's tables
   are made from it. */
static const struct {
    const char *literal;
    unsigned rule;
} anchors[] = {
    {"Bearer", 0}, {"Basic", 0},
    {"sk-", 1}, {"sk_", 1},
    {"AKIA", 2}, {"ASIA", 2}, {"AIza", 2},
    {"ya29.", 3},
    {"ghp_", 4}, {"gho_", 4}, {"ghu_", 4}, {"ghs_", 4}, {"ghr_", 4}, {"github_pat_", 4},
    {"hf_", 4},
    {"xoxa-", 5}, {"xoxb-", 5}, {"xoxe-", 5}, {"xoxo-", 5}, {"xoxp-", 5}, {"xoxr-", 5},
    {"xoxs-", 5}, {"xapp-", 5},
    {"eyJ", 6},
};
#define ANCHORS (sizeof(anchors) / sizeof(anchors[0]))

/* The bits of the rules whose literal starts at i. */
static inline unsigned
anchor_at(const Text *t, Py_ssize_t i)
{
    Py_UCS4 c = at(t, i);
    unsigned group = c < 256 ? anchor_chars[c] : 0;
    if (!group) {
        return 0;
    }
    unsigned found = 0;
    for (size_t k = anchor_group_end[group - 1]; k < anchor_group_end[group]; k++) {
        if (literal_at(t, i, anchors[k].literal)) {
            found |= 1u << anchors[k].rule;
        }
    }
    return found;
}

PyDoc_STRVAR(token_anchors_doc,
             "token_anchors(text, /)\n--\n\n"
             "A bit for each rule of TOKEN_ANCHOR_RULES whose literal is in text (bit 0 the "
             "first): "
             "a rule without its bit cannot match.");

static PyObject *
token_anchors(PyObject *Py_UNUSED(module), PyObject *text)
{
    Text t;
    if (load_text(text, &t) < 0) {
        return NULL;
    }
    const unsigned all = (1u << TOKEN_ANCHOR_RULES) - 1;
    unsigned found = 0;
    if (t.kind == PyUnicode_1BYTE_KIND) {
        /* A character pair for each: far fewer stops than at every "e" or "s". Every anchor has
           three characters or more, so none starts at the last two. */
        const Py_UCS1 *p = (const Py_UCS1 *)t.data;
        for (Py_ssize_t i = 0; i + 2 < t.size && found != all; i++) {
            if (anchor_pairs[anchor_chars[p[i]]][p[i + 1]]) {
                found |= anchor_at(&t, i);
            }
        }
    }
    else {
        for (Py_ssize_t i = next_in(&t, 0, anchor_chars); i < t.size && found != all;
             i = next_in(&t, i + 1, anchor_chars)) {
            found |= anchor_at(&t, i);
        }
    }
    return PyLong_FromUnsignedLong(found);
}

/* --- KeyModes: the modes of the keys seen, kept by their characters ------------------------------

   Looking a key up in the sanitizer's dict needs a str made for it (and hashed) at every separator,
   about 90 ns each. A KeyModes keeps the mode of each key it has looked up in a direct-mapped table
   (a slot a key, replaced on a collision, so its size is bounded) compared by characters, and
   asks the dict only for a key it does not hold. A key's mode never changes for a sanitizer (its
   rules are fixed in __init__), so a kept mode is never stale. */

#define TABLE_SLOTS 1024 /* a power of two */

typedef struct {
    Py_hash_t hash;
    PyObject *key;  /* the separator and key reversed; NULL for an empty slot */
    PyObject *mode; /* what modes[key] gave */
    int secret;     /* its truth */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot slots[TABLE_SLOTS];
} KeyModes;

/* FNV-1a over the match, read from its end (the reversed key's first character) to its start. */
static inline Py_hash_t
match_hash(const Text *t, Py_ssize_t start, Py_ssize_t end)
{
    uint64_t h = 14695981039346656037ULL;
    for (Py_ssize_t i = end; i >= start; i--) {
        h = (h ^ at(t, i)) * 1099511628211ULL;
    }
    return (Py_hash_t)(h ^ (h >> 32));
}

static inline int
slot_holds(const Slot *slot, Py_hash_t hash, const Text *t, Py_ssize_t start, Py_ssize_t end)
{
    if (slot->key == NULL || slot->hash != hash) {
        return 0;
    }
    Py_ssize_t length = end - start + 1;
    if (PyUnicode_GET_LENGTH(slot->key) != length) {
        return 0;
    }
    int kind = PyUnicode_KIND(slot->key);
    const void *data = PyUnicode_DATA(slot->key);
    for (Py_ssize_t k = 0; k < length; k++) {
        if (PyUnicode_READ(kind, data, k) != at(t, end - k)) {
            return 0;
        }
    }
    return 1;
}

static void
KeyModes_dealloc(KeyModes *self)
{
    for (Py_ssize_t i = 0; i < TABLE_SLOTS; i++) {
        Py_CLEAR(self->slots[i].key);
        Py_CLEAR(self->slots[i].mode);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The slot for the key from start to end, filled from modes[key] when it holds another key; NULL
   with an exception set when the lookup failed. */
static Slot *
lookup(KeyModes *self, PyObject *modes, const Text *t, Py_ssize_t start, Py_ssize_t end)
{
    Py_hash_t hash = match_hash(t, start, end);
    Slot *slot = &self->slots[(size_t)hash & (TABLE_SLOTS - 1)];
    if (slot_holds(slot, hash, t, start, end)) {
        return slot;
    }
    PyObject *key = reversed_slice(t, start, end);
    if (key == NULL) {
        return NULL;
    }
    PyObject *mode = PyObject_GetItem(modes, key); /* may run Python code (__missing__) */
    if (mode == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    int secret = PyObject_IsTrue(mode);
    if (secret < 0) {
        Py_DECREF(key);
        Py_DECREF(mode);
        return NULL;
    }
    PyObject *old_key = slot->key, *old_mode = slot->mode;
    slot->hash = hash;
    slot->key = key;
    slot->mode = mode;
    slot->secret = secret;
    Py_XDECREF(old_key);
    Py_XDECREF(old_mode);
    return slot;
}

PyDoc_STRVAR(secret_separators_doc,
             "secret_separators($self, text, modes, /)\n--\n\n"
             "(where the value starts, mode) for each separator whose key's mode is true, in text "
             "order. modes maps the separator and key reversed (as pair_matches gives it) to the "
             "key's mode; it is asked once for each key this table does not hold.");

static PyObject *
KeyModes_secret_separators(KeyModes *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "secret_separators takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Text t;
    if (load_text(args[0], &t) < 0) {
        return NULL;
    }
    PyObject *modes = args[1];
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    Pair pair;
    for (Py_ssize_t i = next_pair(&t, 0, &pair); i < t.size; i = next_pair(&t, i + 1, &pair)) {
        Slot *slot = lookup(self, modes, &t, pair.key_start, pair.match_end);
        if (slot == NULL) {
            goto error;
        }
        /* The mode is owned before the tuple is built: that may run a collection, whose
           finalizers may let another thread replace this slot. */
        if (slot->secret && append_pair(out, pair.value_start, Py_NewRef(slot->mode)) < 0) {
            goto error;
        }
    }
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(reduce_doc, "A copy, or an unpickled table, starts empty: it is only a cache.");

static PyObject *
KeyModes_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(O())", (PyObject *)Py_TYPE(self));
}

static PyMethodDef KeyModes_methods[] = {
    {"__reduce__", (PyCFunction)KeyModes_reduce, METH_NOARGS, reduce_doc},
    {"secret_separators", (PyCFunction)(void (*)(void))KeyModes_secret_separators, METH_FASTCALL,
     secret_separators_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeyModesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "upstream_ops._speedups.KeyModes",
    .tp_doc = PyDoc_STR("KeyModes()\n--\n\nThe key modes a sanitizer looked up, kept for "
                        "secret_separators (at most 1,024 keys)."),
    .tp_basicsize = sizeof(KeyModes),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)KeyModes_dealloc,
    .tp_methods = KeyModes_methods,
};

/* --- Control characters: _sanitize_text._strip_controls ---------------------------------------

   Most messages hold no control character, and _strip_controls still encoded them to UTF-8,
   translated the bytes and compared them: 1.5 µs on 2 KiB. has_controls tells in one pass over the
   characters whether there is anything to strip; tests/test_sanitize_speedups.py checks it against
   _strip_controls on generated text. */

/* Whether c is stripped from message text: an ASCII control but tab and newline, a C1 control, a
   bidi override or isolate, or a lone surrogate (_sanitize_text._UNICODE_CONTROLS). */
static inline int
is_control(Py_UCS4 c)
{
    if (c < 0x20) {
        return c != '\t' && c != '\n';
    }
    return (c >= 0x7F && c <= 0x9F) || (c >= 0x202A && c <= 0x202E) ||
           (c >= 0x2066 && c <= 0x2069) || (c >= 0xD800 && c <= 0xDFFF);
}

PyDoc_STRVAR(has_controls_doc,
             "has_controls(text, /)\n--\n\n"
             "Whether text holds a character _strip_controls strips from message text: an ASCII "
             "control other than tab and newline, DEL, a C1 control, a bidi override or isolate, "
             "or a lone surrogate.");

static PyObject *
has_controls(PyObject *module, PyObject *text)
{
    (void)module;
    Text t;
    if (load_text(text, &t) < 0) {
        return NULL;
    }
    if (t.kind == PyUnicode_1BYTE_KIND) {
        /* Without a branch per character, so that the compiler can test many at once; a block
           of 256 at a time, so that a control early on ends the pass early. */
        const Py_UCS1 *data = t.data;
        for (Py_ssize_t block = 0; block < t.size; block += 256) {
            Py_ssize_t end = block + 256 < t.size ? block + 256 : t.size;
            unsigned int found = 0;
            for (Py_ssize_t i = block; i < end; i++) {
                Py_UCS1 c = data[i];
                found |= (unsigned int)((c < 0x20) & (c != '\t') & (c != '\n')) |
                         (unsigned int)((Py_UCS1)(c - 0x7F) <= 0x9F - 0x7F);
            }
            if (found) {
                Py_RETURN_TRUE;
            }
        }
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t i = 0; i < t.size; i++) {
        if (is_control(at(&t, i))) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

/* --- The values of secret keys: Sanitizer._redact_values ---------------------------------------

   Once the key/value pass has found where each secret key's value starts, _redact_values reads
   each value with the _VALUE pattern (_sanitize_rules) and puts the redaction in its place: a regex
   match and a dozen Python steps per value, a third of the time of a 2 KiB text with four secrets.
   redact_values is that loop with _VALUE read by hand. It must agree with the pattern exactly, as
   the key pass does: tests/test_sanitize_speedups.py checks both on generated text. The auth
   scheme before a credential ("Bearer ...") is still matched by _SCHEME, which is passed in: it is
   case-insensitive by Unicode's rules. */

#define SECRET 1             /* _sanitize_rules._SECRET */
#define SECRET_TO_LINE_END 2 /* _sanitize_rules._SECRET_TO_LINE_END */

enum { VALUE_NONE, VALUE_QUOTED, VALUE_FLAT, VALUE_LITERAL, VALUE_BARE };

/* A match of _VALUE: which alternative, and its groups' spans (open and close for the quoted ones,
   the whole value for flat and bare). */
typedef struct {
    int what;
    Py_ssize_t open_start, open_end, close_start, close_end;
} ValueMatch;

static inline int
char_in(Py_UCS4 c, const char *set)
{
    return c < 128 && c != 0 && strchr(set, (int)c) != NULL;
}

static inline int
is_blank(Py_UCS4 c)
{
    return c == ' ' || c == '\t';
}

/* [^\s&;,"'<>(){}]: a character of a bare value (\s by Unicode's rules, as re reads str). */
static inline int
is_bare_char(Py_UCS4 c)
{
    return !Py_UNICODE_ISSPACE(c) && !char_in(c, "&;,\"'<>(){}");
}

/* The body of a string quoted with q: [^q\\\n]*+(?:\\.[^q\\\n]*+)*+ from i; where it ends. */
static Py_ssize_t
quoted_body(const Text *t, Py_ssize_t i, Py_UCS4 q)
{
    for (;;) {
        while (i < t->size && at(t, i) != q && at(t, i) != '\\' && at(t, i) != '\n') {
            i++;
        }
        if (i + 1 < t->size && at(t, i) == '\\') {
            i += 2; /* \\. with DOTALL: any character */
            continue;
        }
        return i;
    }
}

/* The body of an escaped string (eqo):
   [^"\\\n]*+(?:(?:\\\\(?:\\.|[^"\\\n])|\\[^"\\\n])[^"\\\n]*+)*+ */
static Py_ssize_t
escaped_body(const Text *t, Py_ssize_t i)
{
    for (;;) {
        while (i < t->size && !char_in(at(t, i), "\"\\\n")) {
            i++;
        }
        if (i >= t->size || at(t, i) != '\\') {
            return i;
        }
        if (i + 1 < t->size && at(t, i + 1) == '\\') {
            if (i + 3 < t->size && at(t, i + 2) == '\\') {
                i += 4; /* \\\\ then \\. */
                continue;
            }
            if (i + 2 < t->size && !char_in(at(t, i + 2), "\"\\\n")) {
                i += 3; /* \\\\ then [^"\\\n] */
                continue;
            }
        }
        if (i + 1 < t->size && !char_in(at(t, i + 1), "\"\\\n")) {
            i += 2; /* \\[^"\\\n] */
            continue;
        }
        return i;
    }
}

static int
starts_with(const Text *t, Py_ssize_t i, const char *literal)
{
    for (; *literal; literal++, i++) {
        if (i >= t->size || at(t, i) != (Py_UCS4)(unsigned char)*literal) {
            return 0;
        }
    }
    return 1;
}

/* Whether the text at i repeats the n characters at j. */
static int
repeats(const Text *t, Py_ssize_t i, Py_ssize_t j, Py_ssize_t n)
{
    if (i + n > t->size) {
        return 0;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (at(t, i + k) != at(t, j + k)) {
            return 0;
        }
    }
    return 1;
}

/* _VALUE.match(text, i), its alternatives tried in the pattern's order. */
static ValueMatch
match_value(const Text *t, Py_ssize_t i)
{
    ValueMatch m = {VALUE_NONE, 0, 0, 0, 0};
    Py_ssize_t n = t->size;
    if (i < n && at(t, i) == '>') {
        i++; /* not taking it cannot match either: no alternative starts with '>' */
    }
    for (int blanks = 0; blanks < 16 && i < n && is_blank(at(t, i)); blanks++) {
        i++;
    }
    if (i < n && at(t, i) == '\n') { /* (?:\n[ \t]{0,64}+(?=["'\\\[{]))? */
        Py_ssize_t j = i + 1;
        for (int blanks = 0; blanks < 64 && j < n && is_blank(at(t, j)); blanks++) {
            j++;
        }
        if (j < n && char_in(at(t, j), "\"'\\[{")) {
            i = j;
        }
    }
    if (i >= n) {
        return m;
    }
    Py_UCS4 c = at(t, i);
    Py_UCS4 next = i + 1 < n ? at(t, i + 1) : 0;
    /* (?P<dqo>[bBrRuU]?")... and, after the others below, (?P<sqo>[bBrRuU]?')... */
    Py_ssize_t double_open = c == '"' ? i + 1 : char_in(c, "bBrRuU") && next == '"' ? i + 2 : -1;
    if (double_open >= 0) {
        m.what = VALUE_QUOTED;
        m.open_start = i;
        m.open_end = double_open;
        m.close_start = quoted_body(t, double_open, '"');
        m.close_end = m.close_start + (m.close_start < n && at(t, m.close_start) == '"');
        return m;
    }
    if (c == '\\' && next == '"') { /* (?P<eqo>\\")...(?P<eqc>(?:\\")?) */
        m.what = VALUE_QUOTED;
        m.open_start = i;
        m.open_end = i + 2;
        m.close_start = escaped_body(t, i + 2);
        m.close_end = m.close_start +
                      2 * (m.close_start + 1 < n && at(t, m.close_start) == '\\' &&
                           at(t, m.close_start + 1) == '"');
        return m;
    }
    if (c == '[' || c == '{') { /* (?P<flat>\[[^\[\]{}]*+\]|\{[^{}]*+\}) */
        const char *stops = c == '[' ? "[]{}" : "{}";
        Py_UCS4 close = c == '[' ? ']' : '}';
        Py_ssize_t j = i + 1;
        while (j < n && !char_in(at(t, j), stops)) {
            j++;
        }
        if (j < n && at(t, j) == close) {
            m.what = VALUE_FLAT;
            m.open_start = i;
            m.close_end = j + 1;
            return m;
        }
    }
    static const char *const literals[] = {"null", "true", "false", "None", "True", "False", "nil"};
    for (size_t k = 0; k < sizeof(literals) / sizeof(literals[0]); k++) {
        if (starts_with(t, i, literals[k])) {
            Py_ssize_t after = i + (Py_ssize_t)strlen(literals[k]);
            Py_UCS4 a = after < n ? at(t, after) : 0;
            if (!(a < 128 && (isalnum((int)a) || a == '_' || a == '-'))) {
                m.what = VALUE_LITERAL;
                return m;
            }
        }
    }
    Py_ssize_t single_open = c == '\'' ? i + 1 : char_in(c, "bBrRuU") && next == '\'' ? i + 2 : -1;
    if (single_open >= 0) {
        m.what = VALUE_QUOTED;
        m.open_start = i;
        m.open_end = single_open;
        m.close_start = quoted_body(t, single_open, '\'');
        m.close_end = m.close_start + (m.close_start < n && at(t, m.close_start) == '\'');
        return m;
    }
    if (c == '\\') { /* (?P<bqo>\\{2,8}+")(?:(?!(?P=bqo))[^\n])*+(?P<bqc>(?P=bqo)?) */
        Py_ssize_t j = i;
        while (j < n && j - i < QUOTE_BACKSLASHES && at(t, j) == '\\') {
            j++;
        }
        if (j - i >= 2 && j < n && at(t, j) == '"') {
            Py_ssize_t width = j + 1 - i, k = j + 1;
            while (k < n && at(t, k) != '\n' && !repeats(t, k, i, width)) {
                k++;
            }
            m.what = VALUE_QUOTED;
            m.open_start = i;
            m.open_end = j + 1;
            m.close_start = k;
            m.close_end = k + (repeats(t, k, i, width) ? width : 0);
            return m;
        }
    }
    Py_ssize_t j = i;
    while (j < n && is_bare_char(at(t, j))) {
        j++;
    }
    if (j > i) {
        m.what = VALUE_BARE;
        m.open_start = i;
        m.close_end = j;
    }
    return m;
}

/* scheme_match(text, start[, end]): the scheme's end and text (a new reference), or end -1 when
   none matched; -1 with an error. */
static int
match_scheme(PyObject *scheme_match, PyObject *text, Py_ssize_t start, Py_ssize_t end,
             Py_ssize_t *scheme_end, PyObject **scheme_text)
{
    PyObject *match = end < 0 ? PyObject_CallFunction(scheme_match, "On", text, start)
                              : PyObject_CallFunction(scheme_match, "Onn", text, start, end);
    *scheme_end = -1;
    *scheme_text = NULL;
    if (match == NULL) {
        return -1;
    }
    if (match == Py_None) {
        Py_DECREF(match);
        return 0;
    }
    PyObject *found_end = PyObject_CallMethod(match, "end", NULL);
    *scheme_text = PyObject_CallMethod(match, "group", NULL);
    Py_DECREF(match);
    if (found_end == NULL || *scheme_text == NULL) {
        Py_XDECREF(found_end);
        Py_CLEAR(*scheme_text);
        return -1;
    }
    *scheme_end = PyLong_AsSsize_t(found_end);
    Py_DECREF(found_end);
    if (*scheme_end == -1 && PyErr_Occurred()) {
        Py_CLEAR(*scheme_text);
        return -1;
    }
    return 0;
}

/* _sanitize_rules._value_span: 1 with the value's span and its replacement (a new reference),
   0 when the value is kept, -1 with an error. */
static int
value_span(PyObject *text, const Text *t, Py_ssize_t position, long mode, PyObject *scheme_match,
           PyObject *redacted, Py_ssize_t *start, Py_ssize_t *end, PyObject **replacement)
{
    ValueMatch m = match_value(t, position);
    Py_ssize_t scheme_end;
    PyObject *scheme;
    if (m.what == VALUE_BARE) {
        *start = m.open_start;
        *end = m.close_end;
        if (mode == SECRET && !(*end < t->size && is_blank(at(t, *end)))) {
            *replacement = Py_NewRef(redacted); /* the common case: key=value, "key": 123 */
            return 1;
        }
        if (match_scheme(scheme_match, text, *start, -1, &scheme_end, &scheme) < 0) {
            return -1;
        }
        if (mode == SECRET_TO_LINE_END) {
            Py_ssize_t line_end = *start;
            while (line_end < t->size && at(t, line_end) != '\n') {
                line_end++;
            }
            *end = line_end;
        }
        else if (scheme != NULL) {
            /* The credential follows the last of the scheme words ("Key Bearer abc"). */
            Py_ssize_t credential = scheme_end, inner_end;
            PyObject *inner;
            for (;;) {
                if (match_scheme(scheme_match, text, credential, -1, &inner_end, &inner) < 0) {
                    Py_DECREF(scheme);
                    return -1;
                }
                if (inner == NULL) {
                    break;
                }
                Py_DECREF(inner);
                credential = inner_end;
            }
            if (credential < t->size && is_bare_char(at(t, credential))) {
                while (credential < t->size && is_bare_char(at(t, credential))) {
                    credential++;
                }
                *end = credential;
            }
        }
        if (scheme != NULL && scheme_end < *end) {
            *replacement = PyUnicode_Concat(scheme, redacted);
        }
        else {
            *replacement = Py_NewRef(redacted);
        }
        Py_XDECREF(scheme);
        return *replacement == NULL ? -1 : 1;
    }
    if (m.what == VALUE_QUOTED) {
        if (m.open_end == m.close_start) {
            return 0; /* "": whether a secret was empty is worth seeing */
        }
        scheme = NULL;
        if (mode == SECRET_TO_LINE_END &&
            match_scheme(scheme_match, text, m.open_end, m.close_start, &scheme_end, &scheme) < 0) {
            return -1;
        }
        PyObject *open = PyUnicode_Substring(text, m.open_start, m.open_end);
        PyObject *close = PyUnicode_Substring(text, m.close_start, m.close_end);
        PyObject *keep = open != NULL && scheme != NULL ? PyUnicode_Concat(open, scheme)
                                                        : Py_XNewRef(open);
        PyObject *head = keep != NULL ? PyUnicode_Concat(keep, redacted) : NULL;
        *replacement = head != NULL && close != NULL ? PyUnicode_Concat(head, close) : NULL;
        Py_XDECREF(open);
        Py_XDECREF(close);
        Py_XDECREF(keep);
        Py_XDECREF(head);
        Py_XDECREF(scheme);
        *start = m.open_start;
        *end = m.close_end;
        return *replacement == NULL ? -1 : 1;
    }
    if (m.what == VALUE_FLAT) {
        *start = m.open_start;
        *end = m.close_end;
        *replacement = Py_NewRef(redacted);
        return 1;
    }
    return 0; /* no value, or null, true, false ... */
}

static int
append_slice(PyObject *out, PyObject *text, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *part = PyUnicode_Substring(text, start, end);
    if (part == NULL) {
        return -1;
    }
    int appended = PyList_Append(out, part);
    Py_DECREF(part);
    return appended;
}

PyDoc_STRVAR(redact_values_doc,
             "redact_values(text, hits, scheme_match, inner_checks, redacted, /)\n--\n\n"
             "text with the value after each of hits, (where the value starts, key mode) in text "
             "order, replaced as Sanitizer._redact_values replaces it; scheme_match is "
             "_SCHEME.match, inner_checks how many values of keys inside a redacted value are "
             "read, redacted the replacement text.");

static PyObject *
redact_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "redact_values expected 5 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *text = args[0], *hits = args[1], *scheme_match = args[2], *redacted = args[4];
    Py_ssize_t inner_checks = PyLong_AsSsize_t(args[3]);
    if (inner_checks == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Text t;
    if (load_text(text, &t) < 0) {
        return NULL;
    }
    if (!PyList_Check(hits) || !PyUnicode_Check(redacted) || !PyCallable_Check(scheme_match)) {
        PyErr_SetString(PyExc_TypeError,
                        "redact_values expects a str, a list, a callable, an int and a str");
        return NULL;
    }
    if (PyList_GET_SIZE(hits) == 0) {
        return Py_NewRef(text);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    Py_ssize_t done = 0;
    for (Py_ssize_t h = 0; h < PyList_GET_SIZE(hits); h++) {
        PyObject *hit = PyList_GET_ITEM(hits, h);
        if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 2) {
            PyErr_SetString(PyExc_TypeError, "each hit must be a (position, mode) tuple");
            goto error;
        }
        Py_ssize_t position = PyLong_AsSsize_t(PyTuple_GET_ITEM(hit, 0));
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(hit, 1));
        if ((position == -1 || mode == -1) && PyErr_Occurred()) {
            goto error;
        }
        if (position < 0 || position > t.size) {
            PyErr_SetString(PyExc_ValueError, "a hit's position is outside the text");
            goto error;
        }
        Py_ssize_t start, end;
        PyObject *replacement = NULL;
        if (position >= done) {
            int found = value_span(text, &t, position, mode, scheme_match, redacted, &start, &end,
                                   &replacement);
            if (found < 0) {
                goto error;
            }
            if (found) {
                int appended = append_slice(out, text, done, start) < 0 ||
                               PyList_Append(out, replacement) < 0;
                Py_DECREF(replacement);
                if (appended) {
                    goto error;
                }
                done = end;
            }
            continue;
        }
        /* A key inside a value already redacted, whose own value may reach past that value: a
           few are read, then the rest of the line goes (see _redact_values). */
        if (inner_checks > 0) {
            inner_checks--;
            int found = value_span(text, &t, position, mode, scheme_match, redacted, &start, &end,
                                   &replacement);
            if (found < 0) {
                goto error;
            }
            Py_XDECREF(replacement);
            if (!found) {
                end = done;
            }
        }
        else {
            end = done;
            while (end < t.size && at(&t, end) != '\n') {
                end++;
            }
        }
        if (end > done) {
            if (PyList_Append(out, redacted) < 0) {
                goto error;
            }
            done = end;
        }
    }
    if (append_slice(out, text, done, t.size) < 0) {
        goto error;
    }
    PyObject *empty = PyUnicode_New(0, 0);
    PyObject *joined = empty != NULL ? PyUnicode_Join(empty, out) : NULL;
    Py_XDECREF(empty);
    Py_DECREF(out);
    return joined;
error:
    Py_DECREF(out);
    return NULL;
}

/* --- An event from its fields: collector._event_from_fields ------------------------------------

   append_upstream_error(**fields) checks each field's type and cleans each text, most texts being
   ones the sanitizer has cleaned before (its kept results), and makes the event. In Python the
   check was a loop over the fields, and the event a call of the dataclass __init__ with the fields
   as keywords (matching names to 22 parameters), an upper() and a clock read: most of the cost of
   an append. event_from_fields runs the loop for every field it can finish; when it finishes them
   all it makes the event too, and otherwise it leaves the rest (a value to coerce, a text not
   cleaned before, a name that is no field) to the Python loop. */

#define MAX_SLOTS 64
#define SLOT_UPPER 1
#define SLOT_CLOCK 2

static int now_ms(long long *ms);
static PyObject *s_upper = NULL;

/* One field: 1 when it is finished (its type is the rule's, and a text either is empty or has its
   cleaned text in the cache of its kind, now stored in fields unless fields is NULL), 0 when
   Python must look at it, -1 on an error. When finished, *slot is the rule's slot index (-1
   without one) and *finished the field's value, a new reference. */
static int
clean_field(PyObject *fields, PyObject *rules, PyObject *cached, PyObject *name, PyObject *value,
            Py_ssize_t *slot, PyObject **finished)
{
    PyObject *rule = PyDict_GetItemWithError(rules, name);
    if (rule == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* no such field: Python says so */
    }
    if (!PyTuple_CheckExact(rule) || PyTuple_GET_SIZE(rule) != 3) {
        return 0;
    }
    PyObject *expected = PyTuple_GET_ITEM(rule, 0), *kind = PyTuple_GET_ITEM(rule, 1);
    PyObject *index = PyTuple_GET_ITEM(rule, 2);
    *slot = PyLong_CheckExact(index) ? PyLong_AsSsize_t(index) : -1;
    if (*slot == -1 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    if ((PyObject *)Py_TYPE(value) != expected) {
        return 0; /* coerced (or refused) by Python */
    }
    if (kind == Py_None || (PyUnicode_CheckExact(value) && PyUnicode_GET_LENGTH(value) == 0)) {
        Py_INCREF(value); /* no text, or an empty one: kept as it is */
        *finished = value;
        return 1;
    }
    if (!PyUnicode_CheckExact(value) || !PyLong_CheckExact(kind)) {
        return 0;
    }
    Py_ssize_t k = PyLong_AsSsize_t(kind);
    if (k < 0 || k >= PyTuple_GET_SIZE(cached)) {
        PyErr_Clear();
        return 0;
    }
    PyObject *cache = PyTuple_GET_ITEM(cached, k);
    if (!PyDict_CheckExact(cache)) {
        return 0;
    }
    PyObject *cleaned = PyDict_GetItemWithError(cache, value);
    if (cleaned == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* not cleaned before: the sanitizer runs */
    }
    Py_INCREF(cleaned);
    if (cleaned != value && fields != NULL) {
        /* The key is there already: its value is replaced, and the dict keeps its layout (as the
           C API allows while PyDict_Next walks it). */
        if (PyDict_SetItem(fields, name, cleaned) < 0) {
            Py_DECREF(cleaned);
            return -1;
        }
    }
    *finished = cleaned;
    return 1;
}

/* Whether text is ASCII with no lower-case letter: its upper() is equal to it ("POST"). */
static int
ascii_without_lower(PyObject *text)
{
    if (!PyUnicode_IS_ASCII(text)) {
        return 0;
    }
    const Py_UCS1 *data = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(text); i++) {
        if (data[i] >= 'a' && data[i] <= 'z') {
            return 0;
        }
    }
    return 1;
}

/* The value a slot gets from what was given (NULL: nothing) or its default, by its step: a new
   reference, or NULL with an error. */
static PyObject *
slot_value(PyObject *given, PyObject *fallback, long step)
{
    PyObject *value = given != NULL ? given : fallback;
    if (step == SLOT_UPPER && PyUnicode_CheckExact(value) && PyUnicode_GET_LENGTH(value) > 0 &&
        !ascii_without_lower(value)) {
        return PyObject_CallMethodNoArgs(value, s_upper);
    }
    if (step == SLOT_CLOCK) {
        int overflow = 0;
        long long at = PyLong_CheckExact(value) ? PyLong_AsLongLongAndOverflow(value, &overflow) : 0;
        if (at == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (overflow < 0 || (overflow == 0 && at <= 0)) {
            long long ms;
            if (now_ms(&ms) < 0) {
                return NULL;
            }
            return PyLong_FromLongLong(ms);
        }
    }
    Py_INCREF(value);
    return value;
}

/* The last slots tuple valid_slots accepted, kept: the caller passes the same one every time, and a
   tuple cannot change once checked. With it, where each slot that is a plain object member
   (T_OBJECT_EX, writable) of validated_owner lives in an object (-1: set through its descriptor):
   make_event stores such a value in place, as the member's descriptor would after its checks. */
static PyObject *validated_slots = NULL;
static PyObject *validated_owner = NULL;
static Py_ssize_t validated_offsets[MAX_SLOTS];

/* Whether slots is a tuple of up to MAX_SLOTS (name, descriptor that can set, default, int step). */
static int
valid_slots(PyObject *slots)
{
    if (slots == validated_slots) {
        return 1;
    }
    if (!PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) > MAX_SLOTS) {
        return 0;
    }
    Py_ssize_t offsets[MAX_SLOTS];
    PyObject *owner = NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        if (!PyTuple_CheckExact(slot) || PyTuple_GET_SIZE(slot) != 4 ||
            Py_TYPE(PyTuple_GET_ITEM(slot, 1))->tp_descr_set == NULL ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(slot, 3))) {
            return 0;
        }
        PyObject *descriptor = PyTuple_GET_ITEM(slot, 1);
        offsets[i] = -1;
        if (Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
            PyMemberDescrObject *member = (PyMemberDescrObject *)descriptor;
            PyObject *its_type = (PyObject *)PyDescr_TYPE(member);
            if (member->d_member->type == T_OBJECT_EX && !(member->d_member->flags & READONLY) &&
                (owner == NULL || owner == its_type)) {
                owner = its_type;
                offsets[i] = member->d_member->offset;
            }
        }
    }
    memcpy(validated_offsets, offsets, (size_t)PyTuple_GET_SIZE(slots) * sizeof(Py_ssize_t));
    Py_XINCREF(owner);
    Py_XSETREF(validated_owner, owner);
    Py_INCREF(slots);
    Py_XSETREF(validated_slots, slots);
    return 1;
}

/* event_type's object with each slot set from values (new references; NULL: not given) or to
   its default; NULL with an error. */
static PyObject *
make_event(PyObject *type, PyObject *slots, PyObject **values)
{
    PyTypeObject *event_type = (PyTypeObject *)type;
    Py_ssize_t count = PyTuple_GET_SIZE(slots);
    Py_ssize_t offsets[MAX_SLOTS];
    int in_place = slots == validated_slots && validated_owner != NULL &&
                   PyType_IsSubtype(event_type, (PyTypeObject *)validated_owner);
    if (in_place) { /* copied: slot_value may run Python code that validates other slots */
        memcpy(offsets, validated_offsets, (size_t)count * sizeof(Py_ssize_t));
    }
    PyObject *event = event_type->tp_alloc(event_type, 0);
    if (event == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        PyObject *given = values[i], *fallback = PyTuple_GET_ITEM(slot, 2), *value;
        long step = PyLong_AsLong(PyTuple_GET_ITEM(slot, 3));
        if (step == 0) { /* most slots: what was given, else the default */
            value = given != NULL ? given : fallback;
            Py_INCREF(value);
        }
        else if ((value = slot_value(given, fallback, step)) == NULL) {
            Py_DECREF(event);
            return NULL;
        }
        if (in_place && offsets[i] >= 0) {
            PyObject **place = (PyObject **)((char *)event + offsets[i]);
            Py_XSETREF(*place, value);
            continue;
        }
        PyObject *descriptor = PyTuple_GET_ITEM(slot, 1);
        int stored = Py_TYPE(descriptor)->tp_descr_set(descriptor, event, value);
        Py_DECREF(value);
        if (stored < 0) {
            Py_DECREF(event);
            return NULL;
        }
    }
    return event;
}

PyDoc_STRVAR(event_from_fields_doc,
             "event_from_fields(fields, rules, cached, event_type, slots, /)\n--\n\n"
             "Check and clean an event's fields in their order and make the event: the event when "
             "every field is finished, else how many were finished before the first that was not "
             "(an int).\n\n"
             "fields: the event's fields by name; rules: each field's (type, kind of text or None, "
             "slot index); cached: the sanitizer's kept results, one dict per kind of text. A field "
             "is finished when its value has exactly its type and, for a non-empty text, its "
             "cleaned text is kept in cached[kind] (stored into fields). The event is an "
             "event_type object whose slots, each (name, descriptor, default, step), are set from "
             "the fields or to their defaults; step 1 upper-cases a text, step 2 reads the clock "
             "for a missing or non-positive time in ms.");

/* The pass over fields, shared by event_from_fields and the appender: 1 when every field is
   finished and every name is an exact str, each slot's value then in values (new references; NULL:
   not given); 0 when not, *done being how many fields were finished first; -1 on an error. With
   store_back, a cleaned text replaces its value in fields (Python's loop goes on from there);
   without it, fields is left as it was given. */
static int
fields_pass(PyObject *fields, PyObject *rules, PyObject *cached, Py_ssize_t count, int store_back,
            PyObject **values, Py_ssize_t *done)
{
    Py_ssize_t position = 0;
    int whole = 1; /* every name an exact str: no lookup ran Python code that changed fields */
    PyObject *name, *value;
    *done = 0;
    while (PyDict_Next(fields, &position, &name, &value)) {
        whole = whole && PyUnicode_CheckExact(name);
        Py_INCREF(name); /* a comparison in a lookup may run Python code */
        Py_INCREF(value);
        Py_ssize_t slot = -1;
        PyObject *finished_value = NULL;
        int finished = clean_field(store_back ? fields : NULL, rules, cached, name, value, &slot,
                                   &finished_value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (finished < 0) {
            return -1;
        }
        if (!finished) {
            return 0;
        }
        (*done)++;
        if (slot >= 0 && slot < count && values[slot] == NULL) {
            values[slot] = finished_value;
        }
        else { /* a rule without its slot: the event is Python's to make */
            Py_DECREF(finished_value);
            whole = 0;
        }
    }
    return whole && *done == PyDict_GET_SIZE(fields);
}

static PyObject *
event_from_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "event_from_fields expected 5 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *fields = args[0], *rules = args[1], *cached = args[2], *type = args[3];
    PyObject *slots = args[4];
    if (!PyDict_Check(fields) || !PyDict_Check(rules) || !PyTuple_Check(cached) ||
        !PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError,
                        "event_from_fields expects a dict, a dict, a tuple, a type and slots");
        return NULL;
    }
    if (!valid_slots(slots)) {
        PyErr_SetString(PyExc_TypeError,
                        "slots must be up to 64 (name, descriptor, default, step) tuples");
        return NULL;
    }
    PyObject *values[MAX_SLOTS] = {NULL};
    Py_ssize_t count = PyTuple_GET_SIZE(slots), done = 0;
    PyObject *result = NULL;
    int whole = fields_pass(fields, rules, cached, count, 1, values, &done);
    if (whole > 0) {
        result = make_event(type, slots, values);
    }
    else if (whole == 0) {
        result = PyLong_FromSsize_t(done);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_XDECREF(values[i]);
    }
    return result;
}

/* --- append_upstream_error(**fields) as one C call: collector.append_upstream_error ------------

   With event_from_fields, an append still ran a Python frame around it: the keywords unpacked into
   the call and gathered again into a dict (a quarter of the append's instructions), the
   sanitizer's kept results fetched, the labels looked at, and the collector's _store. An Appender
   is called with the keywords' dict as it is, and does all of it for the common case: no event
   given, a Collector (not a subclass) current, the C pass switched on (collector._event_pass),
   the default Sanitizer (not a subclass), every field finished by the pass, no listeners. Anything
   else, and any TypeError or ValueError on the way, goes to the Python function it was made with,
   with the arguments as they came; so does a call whose pass stopped half-way, as fields is left
   as it was given. The event is stored under collector._lock, as Collector._store stores it. */

typedef struct {
    PyObject_HEAD
    PyObject *fallback;          /* the Python append_upstream_error */
    PyObject *collector_var;     /* collector._current */
    PyObject *labels_var;        /* labels._current */
    PyObject *no_labels;         /* labels.NO_LABELS */
    PyObject *collector_type;    /* collector.Collector */
    PyObject *collector_globals; /* collector's module dict: _lock, _event_pass */
    PyObject *sanitize_globals;  /* sanitize's module dict: _default_sanitizer */
    PyObject *sanitizer_type;    /* sanitize.Sanitizer */
    PyObject *rules;             /* collector._FIELD_RULES */
    PyObject *event_type;        /* events.UpstreamErrorEvent */
    PyObject *slots;             /* events._EVENT_SLOTS */
    PyObject *deque_type;        /* collections.deque */
    PyObject *clean_label;       /* sanitize.sanitize_label, for the labels' texts */
    PyObject *dict;              /* __dict__: functools.update_wrapper's attributes */
    Py_ssize_t status_slot, message_slot, detail_slot;
} Appender;

static PyObject *s_finished, *s_events, *s_max_events, *s_dropped_events, *s_listeners;
static PyObject *s_acquire, *s_release, *s_append, *s_fill, *s_lock, *s_event_pass;
static PyObject *s_default_sanitizer, *s_caches, *s_store;

static int
Appender_traverse(Appender *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->collector_var);
    Py_VISIT(self->labels_var);
    Py_VISIT(self->no_labels);
    Py_VISIT(self->collector_type);
    Py_VISIT(self->collector_globals);
    Py_VISIT(self->sanitize_globals);
    Py_VISIT(self->sanitizer_type);
    Py_VISIT(self->rules);
    Py_VISIT(self->event_type);
    Py_VISIT(self->slots);
    Py_VISIT(self->deque_type);
    Py_VISIT(self->clean_label);
    Py_VISIT(self->dict);
    return 0;
}

static int
Appender_clear(Appender *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->collector_var);
    Py_CLEAR(self->labels_var);
    Py_CLEAR(self->no_labels);
    Py_CLEAR(self->collector_type);
    Py_CLEAR(self->collector_globals);
    Py_CLEAR(self->sanitize_globals);
    Py_CLEAR(self->sanitizer_type);
    Py_CLEAR(self->rules);
    Py_CLEAR(self->event_type);
    Py_CLEAR(self->slots);
    Py_CLEAR(self->deque_type);
    Py_CLEAR(self->clean_label);
    Py_CLEAR(self->dict);
    return 0;
}

static void
Appender_dealloc(Appender *self)
{
    PyObject_GC_UnTrack(self);
    Appender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Where the slot called name is in slots; -1 when none is. */
static Py_ssize_t
slot_named(PyObject *slots, const char *name)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        PyObject *slot_name = PyTuple_GET_ITEM(PyTuple_GET_ITEM(slots, i), 0);
        if (PyUnicode_Check(slot_name) && PyUnicode_CompareWithASCIIString(slot_name, name) == 0) {
            return i;
        }
    }
    return -1;
}

static PyObject *
Appender_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fallback",         "collector_var",    "labels_var",
                            "no_labels",        "collector_type",   "collector_globals",
                            "sanitize_globals", "sanitizer_type",   "rules",
                            "event_type",       "slots",            "deque_type",
                            "clean_label",      NULL};
    PyObject *a[13];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!O!O!O!O!O!OO!O:Appender", names, &a[0],
                                     &a[1], &a[2], &a[3], &PyType_Type, &a[4], &PyDict_Type, &a[5],
                                     &PyDict_Type, &a[6], &PyType_Type, &a[7], &PyDict_Type, &a[8],
                                     &PyType_Type, &a[9], &a[10], &PyType_Type, &a[11], &a[12])) {
        return NULL;
    }
    if (!PyCallable_Check(a[0]) || !PyCallable_Check(a[12]) ||
        !PyContextVar_CheckExact(a[1]) || !PyContextVar_CheckExact(a[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "Appender needs callables for fallback and clean_label, and ContextVars");
        return NULL;
    }
    if (!valid_slots(a[10])) {
        PyErr_SetString(PyExc_TypeError,
                        "slots must be up to 64 (name, descriptor, default, step) tuples");
        return NULL;
    }
    Py_ssize_t status = slot_named(a[10], "upstream_status_code");
    Py_ssize_t message = slot_named(a[10], "message"), detail = slot_named(a[10], "detail");
    if (status < 0 || message < 0 || detail < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "slots must name upstream_status_code, message and detail");
        return NULL;
    }
    Appender *self = (Appender *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    PyObject **fields[] = {
        &self->fallback,       &self->collector_var,    &self->labels_var,
        &self->no_labels,      &self->collector_type,   &self->collector_globals,
        &self->sanitize_globals, &self->sanitizer_type, &self->rules,
        &self->event_type,     &self->slots,            &self->deque_type,
        &self->clean_label,
    };
    for (int i = 0; i < 13; i++) {
        Py_INCREF(a[i]);
        *fields[i] = a[i];
    }
    self->status_slot = status;
    self->message_slot = message;
    self->detail_slot = detail;
    return (PyObject *)self;
}

/* Whether an exact int or str (what the pass lets through for these fields) is not empty. */
static inline int
given(PyObject *value)
{
    if (value == NULL) {
        return 0;
    }
    if (PyUnicode_CheckExact(value)) {
        return PyUnicode_GET_LENGTH(value) != 0;
    }
    return PyLong_CheckExact(value) && Py_SIZE(value) != 0;
}

/* Collector._store's keeping, for a Collector: under the module's lock, the first event makes the
   deque (maxlen _max_events), a full deque counts the one it drops. 0, or -1 with an error (the
   lock released either way). */
static int
keep_event(Appender *self, PyObject *collector, PyObject *event)
{
    PyObject *lock = PyDict_GetItemWithError(self->collector_globals, s_lock);
    if (lock == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "upstream_ops.collector has no _lock");
        }
        return -1;
    }
    Py_INCREF(lock);
    PyObject *taken = PyObject_CallMethodNoArgs(lock, s_acquire);
    if (taken == NULL) {
        Py_DECREF(lock);
        return -1;
    }
    Py_DECREF(taken);
    int status = -1;
    PyObject *events = PyObject_GetAttr(collector, s_events);
    PyObject *max_events = PyObject_GetAttr(collector, s_max_events);
    if (events == NULL || max_events == NULL) {
        goto release;
    }
    if (Py_TYPE(events) == (PyTypeObject *)self->deque_type) {
        Py_ssize_t held = PyObject_Length(events);
        Py_ssize_t most = PyLong_AsSsize_t(max_events);
        if (held < 0 || (most == -1 && PyErr_Occurred())) {
            goto release;
        }
        if (held == most) {
            PyObject *dropped = PyObject_GetAttr(collector, s_dropped_events);
            if (dropped == NULL) {
                goto release;
            }
            Py_ssize_t before = PyLong_AsSsize_t(dropped);
            Py_DECREF(dropped);
            if (before == -1 && PyErr_Occurred()) {
                goto release;
            }
            PyObject *one_more = PyLong_FromSsize_t(before + 1);
            if (one_more == NULL) {
                goto release;
            }
            int set = PyObject_SetAttr(collector, s_dropped_events, one_more);
            Py_DECREF(one_more);
            if (set < 0) {
                goto release;
            }
        }
        PyObject *appended = PyObject_CallMethodOneArg(events, s_append, event);
        if (appended == NULL) {
            goto release;
        }
        Py_DECREF(appended);
    }
    else {
        PyObject *made = PyObject_CallFunction(self->deque_type, "(O)O", event, max_events);
        if (made == NULL) {
            goto release;
        }
        int set = PyObject_SetAttr(collector, s_events, made);
        Py_DECREF(made);
        if (set < 0) {
            goto release;
        }
    }
    status = 0;
release:
    Py_XDECREF(events);
    Py_XDECREF(max_events);
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    PyObject *released = PyObject_CallMethodNoArgs(lock, s_release);
    Py_DECREF(lock);
    if (released == NULL) {
        Py_XDECREF(exc_type);
        Py_XDECREF(exc_value);
        Py_XDECREF(exc_tb);
        return -1;
    }
    Py_DECREF(released);
    PyErr_Restore(exc_type, exc_value, exc_tb);
    return status;
}

/* An attribute's truth, -1 with an error. */
static int
attribute_true(PyObject *object, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* The fast path: the stored event, Py_None when nothing is stored, NULL with an error, or
   NotImplemented (borrowed, not returned to Python) when the Python function must do it all. */
static PyObject *
append_fast(Appender *self, PyObject *collector, PyObject *fields)
{
    int finished = attribute_true(collector, s_finished);
    if (finished != 0) {
        return finished < 0 ? NULL : Py_NewRef(Py_None); /* before the work, thrown away */
    }
    PyObject *pass = PyDict_GetItemWithError(self->collector_globals, s_event_pass);
    if (pass == NULL || pass == Py_None) {
        return PyErr_Occurred() ? NULL : Py_NotImplemented;
    }
    PyObject *sanitizer = PyDict_GetItemWithError(self->sanitize_globals, s_default_sanitizer);
    if (sanitizer == NULL || Py_TYPE(sanitizer) != (PyTypeObject *)self->sanitizer_type) {
        return PyErr_Occurred() ? NULL : Py_NotImplemented;
    }
    PyObject *cached = PyObject_GetAttr(sanitizer, s_caches);
    if (cached == NULL) {
        return NULL;
    }
    if (!PyTuple_CheckExact(cached)) {
        Py_DECREF(cached);
        return Py_NotImplemented;
    }
    PyObject *values[MAX_SLOTS] = {NULL};
    Py_ssize_t count = PyTuple_GET_SIZE(self->slots), done = 0;
    int whole = fields_pass(fields, self->rules, cached, count, 0, values, &done);
    Py_DECREF(cached);
    PyObject *event = NULL;
    if (whole > 0) {
        if (given(values[self->status_slot]) || given(values[self->message_slot]) ||
            given(values[self->detail_slot])) {
            event = make_event(self->event_type, self->slots, values);
        }
        else {
            event = Py_NewRef(Py_None); /* no status, no message, no detail: nothing to keep */
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_XDECREF(values[i]);
    }
    if (whole <= 0 || event == NULL || event == Py_None) {
        return whole < 0 ? NULL : whole == 0 ? Py_NotImplemented : event;
    }
    PyObject *labels;
    if (PyContextVar_Get(self->labels_var, self->no_labels, &labels) < 0) {
        Py_DECREF(event);
        return NULL;
    }
    if (labels != self->no_labels) {
        PyObject *filled =
            PyObject_CallMethodObjArgs(labels, s_fill, event, self->clean_label, NULL);
        Py_XDECREF(filled);
        if (filled == NULL) {
            Py_DECREF(labels);
            Py_DECREF(event);
            return NULL;
        }
    }
    Py_DECREF(labels);
    PyObject *listeners = PyObject_GetAttr(collector, s_listeners);
    if (listeners == NULL) {
        Py_DECREF(event);
        return NULL;
    }
    PyObject *stored;
    if (PyList_CheckExact(listeners) && PyList_GET_SIZE(listeners) == 0) {
        /* The labels ran Python code: the record may have been built meanwhile. */
        finished = attribute_true(collector, s_finished);
        if (finished != 0) {
            stored = finished < 0 ? NULL : Py_NewRef(Py_None);
        }
        else {
            stored = keep_event(self, collector, event) < 0 ? NULL : Py_NewRef(event);
        }
    }
    else { /* its listeners are called by Collector._store, which logs one that fails */
        stored = PyObject_CallMethodOneArg(collector, s_store, event);
    }
    Py_DECREF(listeners);
    Py_DECREF(event);
    return stored;
}

static PyObject *
Appender_call(Appender *self, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) == 0 && kwargs != NULL && PyDict_CheckExact(kwargs)) {
        PyObject *collector;
        if (PyContextVar_Get(self->collector_var, Py_None, &collector) < 0) {
            return NULL;
        }
        if (collector == Py_None) {
            return collector; /* outside a request */
        }
        PyObject *stored = NULL;
        if (Py_TYPE(collector) == (PyTypeObject *)self->collector_type) {
            stored = append_fast(self, collector, kwargs);
        }
        else {
            stored = Py_NotImplemented;
        }
        Py_DECREF(collector);
        if (stored != Py_NotImplemented) {
            if (stored != NULL || !(PyErr_ExceptionMatches(PyExc_TypeError) ||
                                    PyErr_ExceptionMatches(PyExc_ValueError))) {
                return stored;
            }
            PyErr_Clear(); /* the Python function says what was wrong */
        }
    }
    return PyObject_Call(self->fallback, args, kwargs);
}

/* Pickled and copied as a function is: by its name in its module (__qualname__, __module__, which
   functools.update_wrapper gives it). */
static PyObject *
Appender_reduce(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyObject_GetAttrString(self, "__qualname__");
}

static PyMethodDef Appender_methods[] = {
    {"__reduce__", Appender_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Appender_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "upstream_ops._speedups.Appender",
    .tp_doc = PyDoc_STR("Appender(fallback, collector_var, labels_var, no_labels, collector_type, "
                        "collector_globals, sanitize_globals, sanitizer_type, rules, event_type, "
                        "slots, deque_type, clean_label)\n--\n\n"
                        "append_upstream_error's common case in one C call; the rest goes to "
                        "fallback."),
    .tp_basicsize = sizeof(Appender),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Appender_new,
    .tp_dealloc = (destructor)Appender_dealloc,
    .tp_traverse = (traverseproc)Appender_traverse,
    .tp_clear = (inquiry)Appender_clear,
    .tp_call = (ternaryfunc)Appender_call,
    .tp_dictoffset = offsetof(Appender, dict),
    .tp_getset = Appender_getset,
    .tp_methods = Appender_methods,
};

static int
appender_exec(PyObject *module)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&s_finished, "_finished"},
        {&s_events, "_events"},
        {&s_max_events, "_max_events"},
        {&s_dropped_events, "dropped_events"},
        {&s_listeners, "listeners"},
        {&s_acquire, "acquire"},
        {&s_release, "release"},
        {&s_append, "append"},
        {&s_fill, "fill"},
        {&s_lock, "_lock"},
        {&s_event_pass, "_event_pass"},
        {&s_default_sanitizer, "_default_sanitizer"},
        {&s_caches, "_caches"},
        {&s_store, "_store"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        Py_XSETREF(*names[i].name, PyUnicode_InternFromString(names[i].text));
        if (*names[i].name == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&AppenderType) < 0) {
        return -1;
    }
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(module, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        return -1;
    }
    return 0;
}

/* --- An event's row in the SQLite sink: sinks._sqlite_rows._event_row ---------------------------

   The writer picks each event's statement by which of its 22 fields are set, once it knows that
   each holds its declared type: two passes over the values and a dict lookup keyed by a tuple in
   Python. event_key is both passes in one call, and an int key. tests/test_speedups_events.py
   checks this function and event_from_fields against the Python code they stand in for. */


PyDoc_STRVAR(event_key_doc,
             "event_key(values, types, optional, /)\n--\n\n"
             "The key of an event's statement: bit i set when values[i] is true, for every field "
             "but values[optional], which adds 1 << len(values) when it is True and 2 << "
             "len(values) when it is False (None adds nothing). -1 when a value is not exactly of "
             "its type in types (values[optional]: True, False or None).");

static PyObject *
event_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "event_key expected 3 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *values = args[0], *types = args[1];
    if (!PyTuple_Check(values) || !PyTuple_Check(types) || !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "event_key expects a tuple, a tuple and an int");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(values);
    Py_ssize_t optional = PyLong_AsSsize_t(args[2]);
    if (optional == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count != PyTuple_GET_SIZE(types) || count > 60) {
        PyErr_SetString(PyExc_ValueError, "event_key takes up to 60 values, one type each");
        return NULL;
    }
    unsigned long long key = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i);
        if (i == optional) {
            if (value == Py_True) {
                key |= 1ULL << count;
            }
            else if (value == Py_False) {
                key |= 2ULL << count;
            }
            else if (value != Py_None) {
                return PyLong_FromLong(-1);
            }
            continue;
        }
        if ((PyObject *)Py_TYPE(value) != PyTuple_GET_ITEM(types, i)) {
            return PyLong_FromLong(-1);
        }
        int truth;
        if (PyUnicode_CheckExact(value)) {
            truth = PyUnicode_GET_LENGTH(value) != 0;
        }
        else if (PyLong_CheckExact(value) || PyFloat_CheckExact(value)) {
            truth = PyObject_IsTrue(value); /* a builtin's own test: runs no Python code */
        }
        else {
            return PyLong_FromLong(-1); /* only str, int and float fields are keyed here */
        }
        if (truth) {
            key |= 1ULL << i;
        }
    }
    return PyLong_FromUnsignedLongLong(key);
}

/* --- Ids: upstream_ops._ids in C -----------------------------------------------------------------

   Every record gets a new id, and a request without an incoming id a new request id: in Python each
   took 5,000 to 8,600 instructions (a lock, two formats, tuple state), most of the cost of building
   a record. The same ids here, from the same parts: the Unix time in ms read from time.time_ns
   (looked up at each call, as the Python code does), random bits from a pool that os.urandom fills
   ID_POOL_BYTES at a time, and the record ids' counter. The GIL guards the state: nothing between
   reading it and storing it calls Python code. */

#define ID_POOL_BYTES 2560 /* 256 ids of 10 bytes */

static unsigned char id_pool[ID_POOL_BYTES];
static Py_ssize_t id_pool_left = 0;
static long long ordered_last_ms = -1; /* ordered_uuid7_hex's last ms and counter */
static unsigned int ordered_counter = 0;
static PyObject *time_module = NULL;
static PyObject *os_urandom = NULL;
static PyObject *s_time_ns = NULL;
static const char hex_digits[] = "0123456789abcdef";

/* Refills the pool from os.urandom; -1 with an error. os.urandom lets go of the GIL while it reads,
   so callers check what is left again afterwards. */
static int
refill_id_pool(void)
{
    PyObject *fresh = PyObject_CallFunction(os_urandom, "n", (Py_ssize_t)ID_POOL_BYTES);
    if (fresh == NULL) {
        return -1;
    }
    if (!PyBytes_Check(fresh) || PyBytes_GET_SIZE(fresh) != ID_POOL_BYTES) {
        Py_DECREF(fresh);
        PyErr_SetString(PyExc_RuntimeError, "os.urandom returned an unexpected value");
        return -1;
    }
    memcpy(id_pool, PyBytes_AS_STRING(fresh), ID_POOL_BYTES);
    Py_DECREF(fresh);
    id_pool_left = ID_POOL_BYTES;
    return 0;
}

/* The Unix time in ms, time.time_ns() // 1_000_000; -1 with an error. */
static int
now_ms(long long *ms)
{
    PyObject *ns = PyObject_CallMethodNoArgs(time_module, s_time_ns);
    if (ns == NULL) {
        return -1;
    }
    long long value = PyLong_AsLongLong(ns);
    Py_DECREF(ns);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    *ms = value / 1000000 - (value < 0 && value % 1000000 != 0); /* floor, as // does */
    return 0;
}

/* now_ms, with at least `need` bytes in the pool when it returns 0; -1 with an error. */
static int
now_ms_with_random(Py_ssize_t need, long long *ms)
{
    for (;;) {
        if (id_pool_left < need && refill_id_pool() < 0) {
            return -1;
        }
        if (now_ms(ms) < 0) {
            return -1;
        }
        if (id_pool_left >= need) { /* another thread may have emptied it meanwhile */
            return 0;
        }
    }
}

static const unsigned char *
take_random(Py_ssize_t n)
{
    id_pool_left -= n;
    return id_pool + id_pool_left;
}

static void
write_hex(char *out, const unsigned char *bytes, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        out[2 * i] = hex_digits[bytes[i] >> 4];
        out[2 * i + 1] = hex_digits[bytes[i] & 0xF];
    }
}

/* The id as a str: 12 hex digits of ms, then the 20 of tail. */
static PyObject *
id_text(long long ms, const char *tail)
{
    PyObject *text = PyUnicode_New(32, 127);
    if (text == NULL) {
        return NULL;
    }
    char *out = (char *)PyUnicode_1BYTE_DATA(text);
    unsigned long long bits = (unsigned long long)ms;
    for (int i = 0; i < 12; i++) {
        out[i] = hex_digits[(bits >> (44 - 4 * i)) & 0xF];
    }
    memcpy(out + 12, tail, 20);
    return text;
}

PyDoc_STRVAR(uuid7_hex_doc,
             "uuid7_hex()\n--\n\n"
             "A new UUIDv7 as 32 lower-case hex digits, ordered by the ms only (_ids.uuid7_hex).");

static PyObject *
uuid7_hex(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    long long ms;
    if (now_ms_with_random(10, &ms) < 0) {
        return NULL;
    }
    unsigned char drawn[10];
    memcpy(drawn, take_random(10), 10);
    drawn[0] = (unsigned char)(0x70 | (drawn[0] & 0x0F)); /* the version, 7 */
    drawn[2] = (unsigned char)(0x80 | (drawn[2] & 0x3F)); /* the variant, 10 */
    char tail[20];
    write_hex(tail, drawn, 10);
    return id_text(ms, tail);
}

PyDoc_STRVAR(ordered_uuid7_hex_doc,
             "ordered_uuid7_hex()\n--\n\n"
             "A new UUIDv7 as 32 lower-case hex digits, increasing within the process "
             "(_ids.ordered_uuid7_hex).");

static PyObject *
ordered_uuid7_hex(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    long long ms;
    if (now_ms_with_random(10, &ms) < 0) {
        return NULL;
    }
    /* From here to the end no Python code runs: the state is read and stored under the GIL. */
    if (ms > ordered_last_ms) {
        const unsigned char *bits = take_random(2);
        ordered_counter = ((unsigned int)bits[0] << 8 | bits[1]) & 0x7FF; /* 2048 more this ms */
    }
    else if (ordered_counter < 0xFFF) {
        ms = ordered_last_ms;
        ordered_counter++;
    }
    else { /* 4096 ids in one ms: borrow the next one */
        ms = ordered_last_ms + 1;
        ordered_counter = 0;
    }
    ordered_last_ms = ms;
    unsigned char drawn[8];
    memcpy(drawn, take_random(8), 8);
    drawn[0] = (unsigned char)(0x80 | (drawn[0] & 0x3F)); /* the variant, 10 */
    char tail[20];
    unsigned int versioned = 0x7000 | ordered_counter;
    for (int i = 0; i < 4; i++) {
        tail[i] = hex_digits[(versioned >> (12 - 4 * i)) & 0xF];
    }
    write_hex(tail + 4, drawn, 8);
    return id_text(ms, tail);
}

PyDoc_STRVAR(forget_random_bits_doc,
             "forget_random_bits()\n--\n\n"
             "Empty the ids' pool of random bits: a forked child must not hand out its parent's.");

static PyObject *
forget_random_bits(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    memset(id_pool, 0, sizeof(id_pool));
    id_pool_left = 0;
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"event_from_fields", (PyCFunction)(void (*)(void))event_from_fields, METH_FASTCALL,
     event_from_fields_doc},
    {"event_key", (PyCFunction)(void (*)(void))event_key, METH_FASTCALL, event_key_doc},
    {"forget_random_bits", forget_random_bits, METH_NOARGS, forget_random_bits_doc},
    {"ordered_uuid7_hex", ordered_uuid7_hex, METH_NOARGS, ordered_uuid7_hex_doc},
    {"has_controls", (PyCFunction)has_controls, METH_O, has_controls_doc},
    {"pair_matches", (PyCFunction)pair_matches, METH_O, pair_matches_doc},
    {"redact_values", (PyCFunction)(void (*)(void))redact_values, METH_FASTCALL,
     redact_values_doc},
    {"token_anchors", (PyCFunction)token_anchors, METH_O, token_anchors_doc},
    {"uuid7_hex", uuid7_hex, METH_NOARGS, uuid7_hex_doc},
    {NULL, NULL, 0, NULL},
};

static int
ids_exec(void)
{
    PyObject *os_module = PyImport_ImportModule("os");
    if (os_module == NULL) {
        return -1;
    }
    Py_XSETREF(os_urandom, PyObject_GetAttrString(os_module, "urandom"));
    Py_DECREF(os_module);
    Py_XSETREF(time_module, PyImport_ImportModule("time"));
    Py_XSETREF(s_time_ns, PyUnicode_InternFromString("time_ns"));
    Py_XSETREF(s_upper, PyUnicode_InternFromString("upper"));
    if (os_urandom == NULL || time_module == NULL || s_time_ns == NULL || s_upper == NULL) {
        return -1;
    }
    return 0;
}

static int
speedups_exec(PyObject *module)
{
    if (ids_exec() < 0 || appender_exec(module) < 0) {
        return -1;
    }
    for (const char *c = "=:%"; *c; c++) {
        separator_chars[(unsigned char)*c] = 1;
    }
    /* Made anew, so that a second run (a reload) finds the same tables. */
    memset(anchor_chars, 0, sizeof(anchor_chars));
    memset(anchor_pairs, 0, sizeof(anchor_pairs));
    unsigned char firsts = 0;
    const unsigned char rows = (unsigned char)(sizeof(anchor_pairs) / sizeof(anchor_pairs[0]));
    for (size_t k = 0; k < ANCHORS; k++) {
        unsigned char first = (unsigned char)anchors[k].literal[0];
        if (!anchor_chars[first]) {
            if (firsts + 1 >= rows) {
                PyErr_SetString(PyExc_SystemError, "more anchor first characters than rows");
                return -1;
            }
            anchor_chars[first] = ++firsts; /* 1 to 8; row 0 stays empty */
        }
        else if (anchor_chars[first] != firsts) {
            PyErr_SetString(PyExc_SystemError, "the anchors are not grouped by first character");
            return -1;
        }
        anchor_pairs[firsts][(unsigned char)anchors[k].literal[1]] = 1;
        anchor_group_end[firsts] = k + 1;
    }
    if (PyType_Ready(&KeyModesType) < 0) {
        return -1;
    }
    PyObject *rules = PyTuple_New(TOKEN_ANCHOR_RULES);
    if (rules == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < (Py_ssize_t)TOKEN_ANCHOR_RULES; i++) {
        PyObject *name = PyUnicode_FromString(token_anchor_rules[i]);
        if (name == NULL) {
            Py_DECREF(rules);
            return -1;
        }
        PyTuple_SET_ITEM(rules, i, name);
    }
    if (PyModule_AddObject(module, "TOKEN_ANCHOR_RULES", rules) < 0) {
        Py_DECREF(rules);
        return -1;
    }
    Py_INCREF(&KeyModesType);
    if (PyModule_AddObject(module, "KeyModes", (PyObject *)&KeyModesType) < 0) {
        Py_DECREF(&KeyModesType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "upstream_ops._speedups",
    .m_doc = "Optional speed-ups in C: the sanitizer's key/value pass (keys and values), the "
             "collector's field pass "
             "and append_upstream_error's common case, the SQLite sink's event key and the ids "
             "(each caller falls back to Python without them).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
