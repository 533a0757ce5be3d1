/* Optional speed-up in C: the per-request object of the WSGI middleware (upstream_ops.wsgi).

   For every request the middleware returns an object to the server that notes the status given
   to start_response, iterates the app's response and, when the server closes it, finishes the
   request: a healthy request under the default rule ends there, any other goes on to the Python
   code that builds its record. In Python that is a generator and four Python calls a request;
   around a Flask app they cost more than the rest of the middleware together.

   Recording is the base of upstream_ops.wsgi._WSGIRequestRecording: it holds the request's state
   (the same attributes as the Python class) and runs the steps every request takes; whatever is
   rarer it leaves to the Python methods of the subclass (_start_response_slow, _finish_slow).
   tests/test_wsgi.py runs every test with it and with the Python class alone.

   Built when a C compiler is there (setup.py marks it optional). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_collector_steps.h"

typedef struct {
    PyObject_HEAD
    PyObject *middleware;
    PyObject *environ;
    PyObject *start_response_of_server; /* "_start_response" in Python */
    PyObject *collector;
    PyObject *telemetry;
    PyObject *token;
    PyObject *context_var; /* collector._current, to reset with token */
    PyObject *result;
    PyObject *status;
    PyObject *route_source;
    PyObject *route_key; /* the environ key the route is read from at start_response, or None */
    PyObject *error;
    PyObject *iterator; /* iter(result), from the first __next__ */
    double started;
    double ended;
    char iteration_started;
    char iteration_ended;
    char finished;
    char no_echo; /* no request id to echo: with no telemetry, start_response needs no Python */
    char default_rule;
} Recording;

/* Set by setup() from the Python module: time.perf_counter and the environ key of an error. */
static PyObject *perf_counter = NULL;
static PyObject *environ_error_key = NULL;
/* Method and attribute names, interned once (PyObject_CallMethod would make a str every call). */
static PyObject *close_name = NULL;
static PyObject *finish_slow_name = NULL;
static PyObject *start_response_slow_name = NULL;

static PyTypeObject RecordingType;

static int
Recording_traverse(Recording *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response_of_server);
    Py_VISIT(self->collector);
    Py_VISIT(self->telemetry);
    Py_VISIT(self->token);
    Py_VISIT(self->context_var);
    Py_VISIT(self->result);
    Py_VISIT(self->status);
    Py_VISIT(self->route_source);
    Py_VISIT(self->route_key);
    Py_VISIT(self->error);
    Py_VISIT(self->iterator);
    return 0;
}

static int
Recording_clear(Recording *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response_of_server);
    Py_CLEAR(self->collector);
    Py_CLEAR(self->telemetry);
    Py_CLEAR(self->token);
    Py_CLEAR(self->context_var);
    Py_CLEAR(self->result);
    Py_CLEAR(self->status);
    Py_CLEAR(self->route_source);
    Py_CLEAR(self->route_key);
    Py_CLEAR(self->error);
    Py_CLEAR(self->iterator);
    return 0;
}

static void
Recording_dealloc(Recording *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Recording_clear(self);
    type->tp_free((PyObject *)self); /* a subclass's reference is dropped by its own dealloc */
}

static double
now(void)
{
    PyObject *value = PyObject_CallNoArgs(perf_counter);
    if (value == NULL) {
        PyErr_Clear();
        return 0.0;
    }
    double seconds = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (seconds == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0.0;
    }
    return seconds;
}

/* getattr(obj, name, None) without making the AttributeError (a list has no close). */
static inline int
lookup_attr(PyObject *obj, PyObject *name, PyObject **found)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, found);
#else
    return _PyObject_LookupAttr(obj, name, found);
#endif
}

static inline void
set_field(PyObject **field, PyObject *value)
{
    Py_XINCREF(value);
    Py_XSETREF(*field, value);
}

/* The error being raised, fetched with its traceback attached (what ``except ... as e`` sees). */
static void
fetch_error(PyObject **type, PyObject **value, PyObject **traceback)
{
    PyErr_Fetch(type, value, traceback);
    PyErr_NormalizeException(type, value, traceback);
    if (*traceback != NULL && *value != NULL) {
        PyException_SetTraceback(*value, *traceback);
    }
}

/* The error now set goes on, with an earlier one (from fetch_error, released here) as its
   context: what Python does for an error raised while another is handled. */
static void
raise_in_context_of(PyObject *type, PyObject *value, PyObject *traceback)
{
    PyObject *later_type, *later, *later_traceback;
    PyErr_Fetch(&later_type, &later, &later_traceback);
    PyErr_NormalizeException(&later_type, &later, &later_traceback);
    if (later != NULL && value != NULL) {
        PyException_SetContext(later, Py_NewRef(value));
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    PyErr_Restore(later_type, later, later_traceback);
}

static PyObject *Recording_new(PyTypeObject *type, PyObject *args, PyObject *kwds);

PyDoc_STRVAR(new_recording_doc,
             "new_recording(cls, middleware, environ, start_response, collector, telemetry, "
             "started, context_var, token, route_key, no_echo, default_rule, /)\n--\n\n"
             "A new cls (a subclass of Recording) for one request, in one call.");

/* A new cls (Recording or a subclass) for one request, its fields filled in. */
static PyObject *
make_recording(PyTypeObject *cls, PyObject *middleware, PyObject *environ, PyObject *start_response,
               PyObject *collector, PyObject *telemetry, double started, PyObject *context_var,
               PyObject *token, PyObject *route_key, char no_echo, char default_rule)
{
    /* Recording's own __new__, not the class's: a subclass's __new__ would want arguments. */
    PyObject *made = Recording_new(cls, NULL, NULL);
    if (made == NULL) {
        return NULL;
    }
    Recording *self = (Recording *)made;
    set_field(&self->middleware, middleware);
    set_field(&self->environ, environ);
    set_field(&self->start_response_of_server, start_response);
    set_field(&self->collector, collector);
    set_field(&self->telemetry, telemetry);
    self->started = started;
    set_field(&self->context_var, context_var);
    set_field(&self->token, token);
    set_field(&self->route_key, route_key);
    self->no_echo = no_echo;
    self->default_rule = default_rule;
    return made;
}

static PyObject *
new_recording(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "new_recording expected 12 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *cls = args[0];
    if (perf_counter == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "upstream_ops._wsgi_recording.setup was not called");
        return NULL;
    }
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &RecordingType)) {
        PyErr_SetString(PyExc_TypeError, "new_recording expects a subclass of Recording first");
        return NULL;
    }
    double started = PyFloat_AsDouble(args[6]);
    if (started == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    int no_echo = PyObject_IsTrue(args[10]);
    int default_rule = PyObject_IsTrue(args[11]);
    if (no_echo < 0 || default_rule < 0) {
        return NULL;
    }
    return make_recording((PyTypeObject *)cls, args[1], args[2], args[3], args[4], args[5], started,
                          args[7], args[8], args[9], (char)no_echo, (char)default_rule);
}

static PyObject *
Recording_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    Recording *self = (Recording *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->status = PyUnicode_New(0, 0);
    if (self->status == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* --- start_response --------------------------------------------------------------------------- */

static PyObject *
Recording_start_response(Recording *self, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    if (!self->no_echo || kwnames != NULL || nargs < 2 || nargs > 3 ||
        self->telemetry != Py_None || self->start_response_of_server == NULL) {
        PyObject *slow = PyObject_GetAttr((PyObject *)self, start_response_slow_name);
        if (slow == NULL) {
            return NULL;
        }
        PyObject *answer = PyObject_Vectorcall(slow, args, (size_t)nargs, kwnames);
        Py_DECREF(slow);
        return answer;
    }
    set_field(&self->status, args[0]);
    if (self->route_key != NULL && self->route_key != Py_None) {
        /* What the route is read from may be gone by the end (Flask's request object). */
        PyObject *source;
        if (PyDict_CheckExact(self->environ)) {
            source = PyDict_GetItemWithError(self->environ, self->route_key);
            if (source == NULL && PyErr_Occurred()) {
                return NULL;
            }
            Py_XINCREF(source);
        }
        else {
            source = PyObject_CallMethod(self->environ, "get", "O", self->route_key);
            if (source == NULL) {
                return NULL;
            }
        }
        Py_XSETREF(self->route_source, source != NULL ? source : Py_NewRef(Py_None));
    }
    if (nargs == 3 && args[2] == Py_None) {
        nargs = 2; /* start_response(status, headers, None): the server is called without it */
    }
    return PyObject_Vectorcall(self->start_response_of_server, args, (size_t)nargs, NULL);
}

/* --- the response's iteration ----------------------------------------------------------------- */

static PyObject *
Recording_iter(Recording *self)
{
    return Py_NewRef(self);
}

static PyObject *
Recording_iternext(Recording *self)
{
    if (self->iteration_ended) {
        return NULL;
    }
    if (!self->iteration_started) {
        self->iteration_started = 1;
        if (self->result == NULL) {
            PyErr_SetString(PyExc_TypeError, "the response has no result to iterate");
            return NULL;
        }
        PyObject *iterator = PyObject_GetIter(self->result);
        if (iterator == NULL) {
            goto failed;
        }
        Py_XSETREF(self->iterator, iterator);
    }
    if (self->iterator == NULL) {
        return NULL;
    }
    PyObject *item = Py_TYPE(self->iterator)->tp_iternext(self->iterator);
    if (item != NULL) {
        return item;
    }
    if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyErr_Clear();
        self->iteration_ended = 1;
        self->ended = now();
        return NULL;
    }
failed:
    self->iteration_ended = 1;
    if (PyErr_ExceptionMatches(PyExc_GeneratorExit)) {
        return NULL; /* as the Python generator: not an error of the response */
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    set_field(&self->error, value);
    self->ended = now();
    PyErr_Restore(type, value, traceback);
    return NULL;
}

/* --- the end of the request ------------------------------------------------------------------- */

/* Whether a status line is healthy by its first character: Python's ``status < "5"``. */
static int
status_below_5(PyObject *status)
{
    if (!PyUnicode_Check(status)) {
        return -1; /* left to the Python code */
    }
    if (PyUnicode_GET_LENGTH(status) == 0) {
        return 1;
    }
    Py_UCS4 first = PyUnicode_READ_CHAR(status, 0);
    return first < '5';
}

static PyObject *
Recording_finish(Recording *self, PyObject *Py_UNUSED(ignored))
{
    if (self->finished) {
        Py_RETURN_NONE;
    }
    self->finished = 1;
    if (self->context_var != NULL && self->token != NULL) {
        if (PyContextVar_Reset(self->context_var, self->token) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
                return NULL;
            }
            PyErr_Clear(); /* closed in another context than the one the app ran in */
            PyObject *token = PyContextVar_Set(self->context_var, Py_None);
            if (token == NULL) {
                return NULL;
            }
            Py_DECREF(token);
        }
    }
    PyObject *error = self->error != NULL ? Py_NewRef(self->error) : Py_NewRef(Py_None);
    if (error == Py_None && self->environ != NULL) {
        PyObject *found;
        if (PyDict_CheckExact(self->environ)) {
            found = PyDict_GetItemWithError(self->environ, environ_error_key);
            if (found == NULL && PyErr_Occurred()) {
                Py_DECREF(error);
                return NULL;
            }
            Py_XINCREF(found);
        }
        else {
            found = PyObject_CallMethod(self->environ, "get", "O", environ_error_key);
            if (found == NULL) {
                Py_DECREF(error);
                return NULL;
            }
        }
        if (found != NULL && PyExceptionInstance_Check(found)) {
            Py_SETREF(error, found);
        }
        else {
            Py_XDECREF(found);
        }
    }
    if (error == Py_None && self->telemetry == Py_None && self->default_rule &&
        self->status != NULL && status_below_5(self->status) == 1 && self->collector != NULL) {
        /* Recorder.finish_if_healthy without its call: a quiet collector gets no record. */
        int is_quiet = quiet_close(self->collector);
        if (is_quiet != 0) {
            Py_DECREF(error);
            return is_quiet < 0 ? NULL : Py_NewRef(Py_None);
        }
    }
    PyObject *answer = PyObject_CallMethodOneArg((PyObject *)self, finish_slow_name, error);
    Py_DECREF(error);
    return answer;
}

static PyObject *
Recording_close(Recording *self, PyObject *Py_UNUSED(ignored))
{
    int failed = 0;
    if (self->result != NULL) {
        PyObject *close;
        if (lookup_attr(self->result, close_name, &close) < 0) {
            failed = 1;
        }
        else if (close != NULL) {
            PyObject *answer = PyObject_CallNoArgs(close);
            Py_DECREF(close);
            failed = answer == NULL;
            Py_XDECREF(answer);
        }
    }
    /* finally: finish (once), whatever close did */
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    if (failed) {
        PyErr_Fetch(&type, &value, &traceback);
    }
    if (!self->finished) {
        PyObject *done = Recording_finish(self, NULL);
        if (done == NULL) {
            if (failed) { /* the error of finish wins, with close's as its context */
                PyErr_NormalizeException(&type, &value, &traceback);
                if (traceback != NULL && value != NULL) {
                    PyException_SetTraceback(value, traceback);
                }
                raise_in_context_of(type, value, traceback);
            }
            return NULL;
        }
        Py_DECREF(done);
    }
    if (failed) {
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Recording_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))Recording_start_response,
     METH_FASTCALL | METH_KEYWORDS,
     "Notes the status on the way to the server's start_response."},
    {"close", (PyCFunction)Recording_close, METH_NOARGS,
     "Closes the app's response and finishes the request, once."},
    {"finish", (PyCFunction)Recording_finish, METH_NOARGS,
     "Ends the request: nothing more for a healthy one, else _finish_slow(error)."},
    {NULL, NULL, 0, NULL},
};

#define OBJECT_MEMBER(name, field) {name, T_OBJECT, offsetof(Recording, field), 0, NULL}

static PyMemberDef Recording_members[] = {
    OBJECT_MEMBER("middleware", middleware),
    OBJECT_MEMBER("environ", environ),
    OBJECT_MEMBER("_start_response", start_response_of_server),
    OBJECT_MEMBER("collector", collector),
    OBJECT_MEMBER("telemetry", telemetry),
    OBJECT_MEMBER("token", token),
    OBJECT_MEMBER("result", result),
    OBJECT_MEMBER("status", status),
    OBJECT_MEMBER("route_source", route_source),
    OBJECT_MEMBER("error", error),
    {"started", T_DOUBLE, offsetof(Recording, started), 0, NULL},
    {"ended", T_DOUBLE, offsetof(Recording, ended), 0, NULL},
    {"iteration_started", T_BOOL, offsetof(Recording, iteration_started), 0, NULL},
    {"finished", T_BOOL, offsetof(Recording, finished), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecordingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "upstream_ops._wsgi_recording.Recording",
    .tp_basicsize = sizeof(Recording),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state of one WSGI request and the steps every request takes (see the module).",
    .tp_new = Recording_new,
    .tp_dealloc = (destructor)Recording_dealloc,
    .tp_traverse = (traverseproc)Recording_traverse,
    .tp_clear = (inquiry)Recording_clear,
    .tp_iter = (getiterfunc)Recording_iter,
    .tp_iternext = (iternextfunc)Recording_iternext,
    .tp_methods = Recording_methods,
    .tp_members = Recording_members,
};

/* --- the middleware's call --------------------------------------------------------------------- */

/* Set by setup() from upstream_ops.wsgi: what the middleware's __call__ reads from its module. */
static PyObject *current_var = NULL;       /* upstream_ops.collector._current */
static PyObject *instrumented_flag = NULL; /* the attribute OpenTelemetry sets on an app */
static PyObject *environ_collector_key = NULL;
static PyObject *recording_class = NULL;   /* upstream_ops.wsgi._CWSGIRequestRecording */
static PyObject *middleware_type = NULL;   /* upstream_ops.wsgi.UpstreamOpsWSGIMiddleware */
static PyObject *serve_name;

static PyObject *app_name, *default_rule_name, *echo_header_name, *environ_key_name,
    *fail_name, *file_wrapper_key, *instrumented_app_name, *live_name, *max_events_name,
    *recorder_name, *route_key_name, *start_response_name, *valid_request_id_name,
    *wrap_close_of_name;

/* An attribute of the middleware: from its instance dict when it is an UpstreamOpsWSGIMiddleware
   (whose class has no descriptor of these names; a subclass's may), else by getattr. New ref. */
static PyObject *
middleware_attr(PyObject *middleware, PyObject *dict, PyObject *name)
{
    if (dict != NULL) {
        PyObject *value = PyDict_GetItemWithError(dict, name);
        if (value != NULL) {
            return Py_NewRef(value);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_GetAttr(middleware, name);
}

/* Whether OpenTelemetry wants this request (then the Python code starts its telemetry): the test
   of UpstreamOpsWSGIMiddleware.__call__. 1, 0, or -1 with an error set. */
static int
wants_telemetry(PyObject *middleware, PyObject *dict)
{
    PyObject *live = middleware_attr(middleware, dict, live_name);
    if (live == NULL) {
        return -1;
    }
    int answer = live_wants(live);
    Py_DECREF(live);
    if (answer != 0) {
        return answer;
    }
    PyObject *instrumented = middleware_attr(middleware, dict, instrumented_app_name);
    if (instrumented == NULL) {
        return -1;
    }
    if (instrumented != Py_None) {
        PyObject *flag;
        if (lookup_attr(instrumented, instrumented_flag, &flag) < 0) {
            Py_DECREF(instrumented);
            return -1;
        }
        answer = flag == Py_True;
        Py_XDECREF(flag);
    }
    Py_DECREF(instrumented);
    return answer != 0 ? answer : span_is_current();
}

/* The collector of a request: Collector(request id or None, recorder.max_events). */
static PyObject *
new_collector(PyObject *middleware, PyObject *dict, PyObject *environ)
{
    PyObject *recorder = middleware_attr(middleware, dict, recorder_name);
    if (recorder == NULL) {
        return NULL;
    }
    PyObject *request_id = Py_NewRef(Py_None);
    PyObject *key = middleware_attr(middleware, dict, environ_key_name);
    if (key == NULL) {
        goto failed;
    }
    if (key != Py_None) {
        PyObject *incoming = PyDict_GetItemWithError(environ, key);
        if (incoming == NULL && PyErr_Occurred()) {
            Py_DECREF(key);
            goto failed;
        }
        if (incoming != NULL && incoming != Py_None) {
            /* valid_request_id(incoming if isinstance(incoming, str) else None) */
            Py_SETREF(request_id,
                      PyObject_CallMethodOneArg(recorder, valid_request_id_name,
                                                PyUnicode_Check(incoming) ? incoming : Py_None));
            if (request_id == NULL) {
                Py_DECREF(key);
                goto failed;
            }
        }
    }
    Py_DECREF(key);
    PyObject *max_events = PyObject_GetAttr(recorder, max_events_name);
    if (max_events == NULL) {
        goto failed;
    }
    PyObject *collector = make_collector(request_id, max_events);
    Py_DECREF(max_events);
    Py_DECREF(request_id);
    Py_DECREF(recorder);
    return collector;
failed:
    Py_XDECREF(request_id);
    Py_DECREF(recorder);
    return NULL;
}

/* The app raised: recording.fail(error), then the app's error goes on (a failing fail's error,
   with the app's as its context, goes instead), as ``except BaseException: fail(); raise``. */
static void
app_raised(PyObject *recording)
{
    PyObject *type, *value, *traceback;
    fetch_error(&type, &value, &traceback);
    PyObject *done = PyObject_CallMethodOneArg(recording, fail_name, value != NULL ? value : Py_None);
    if (done != NULL) {
        Py_DECREF(done);
        PyErr_Restore(type, value, traceback);
        return;
    }
    raise_in_context_of(type, value, traceback);
}

PyDoc_STRVAR(call_doc,
             "call(middleware, environ, start_response, /)\n--\n\n"
             "UpstreamOpsWSGIMiddleware.__call__ in one call: a request OpenTelemetry does not want\n"
             "is served here, any other by middleware._serve (before any step is taken here).");

static PyObject *call_with(PyObject *middleware, PyObject *dict, PyObject *environ,
                           PyObject *start_response, double started);

static PyObject *
serve_in_python(PyObject *middleware, PyObject *environ, PyObject *start_response)
{
    PyObject *args[3] = {middleware, environ, start_response};
    return PyObject_VectorcallMethod(serve_name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "call expected 3 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *middleware = args[0], *environ = args[1], *start_response = args[2];
    if (recording_class == NULL || perf_counter == NULL || !PyDict_CheckExact(environ)) {
        return serve_in_python(middleware, environ, start_response);
    }
    PyObject *dict = NULL;
    if (Py_TYPE(middleware) == (PyTypeObject *)middleware_type) {
        dict = PyObject_GenericGetDict(middleware, NULL);
        if (dict == NULL) {
            return NULL;
        }
    }
    double started = now();
    int telemetry = wants_telemetry(middleware, dict);
    if (telemetry != 0) {
        Py_XDECREF(dict);
        return telemetry < 0 ? NULL : serve_in_python(middleware, environ, start_response);
    }
    PyObject *result = call_with(middleware, dict, environ, start_response, started);
    Py_XDECREF(dict);
    return result;
}

/* The request, with the middleware's instance dict (or NULL) and the time it started. */
static PyObject *
call_with(PyObject *middleware, PyObject *dict, PyObject *environ, PyObject *start_response,
          double started)
{
    /* Everything the request's object needs, read before the first step that changes anything. */
    PyObject *app = NULL, *route_key = NULL, *collector = NULL, *token = NULL, *recording = NULL;
    PyObject *result = NULL;
    int no_echo, default_rule;
    PyObject *echo_header = middleware_attr(middleware, dict, echo_header_name);
    if (echo_header == NULL) {
        return NULL;
    }
    no_echo = echo_header == Py_None;
    Py_DECREF(echo_header);
    default_rule = truth_of(middleware_attr(middleware, dict, default_rule_name));
    if (default_rule < 0) {
        return NULL;
    }
    app = middleware_attr(middleware, dict, app_name);
    if (app == NULL) {
        return NULL;
    }
    route_key = middleware_attr(middleware, dict, route_key_name);
    if (route_key == NULL) {
        goto done;
    }
    collector = new_collector(middleware, dict, environ);
    if (collector == NULL) {
        goto done;
    }
    if (PyDict_SetItem(environ, environ_collector_key, collector) < 0) {
        goto done;
    }
    token = PyContextVar_Set(current_var, collector);
    if (token == NULL) {
        goto done;
    }
    recording = make_recording((PyTypeObject *)recording_class, middleware, environ, start_response,
                               collector, Py_None, started, current_var, token, route_key,
                               (char)no_echo, (char)default_rule);
    if (recording == NULL) {
        /* as if the app had not been called: the collector is no longer current */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyContextVar_Reset(current_var, token) < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(type, value, traceback);
        goto done;
    }
    PyObject *bound = PyObject_GetAttr(recording, start_response_name);
    if (bound == NULL) {
        app_raised(recording);
        goto done;
    }
    PyObject *app_args[2] = {environ, bound};
    result = PyObject_Vectorcall(app, app_args, 2, NULL);
    Py_DECREF(bound);
    if (result == NULL) {
        app_raised(recording);
        goto done;
    }
    PyObject *file_wrapper = PyDict_GetItemWithError(environ, file_wrapper_key);
    if (file_wrapper == NULL && PyErr_Occurred()) {
        Py_CLEAR(result);
        app_raised(recording);
        goto done;
    }
    if (file_wrapper != NULL && PyType_Check(file_wrapper)) {
        Py_INCREF(file_wrapper); /* an __instancecheck__ may change the environ */
        int wrapped = PyObject_IsInstance(result, file_wrapper);
        Py_DECREF(file_wrapper);
        if (wrapped != 0) {
            PyObject *answer =
                wrapped < 0 ? NULL
                            : PyObject_CallMethodOneArg(recording, wrap_close_of_name, result);
            Py_SETREF(result, answer);
            goto done;
        }
    }
    set_field(&((Recording *)recording)->result, result);
    Py_SETREF(result, Py_NewRef(recording));
done:
    Py_XDECREF(recording);
    Py_XDECREF(token);
    Py_XDECREF(collector);
    Py_XDECREF(route_key);
    Py_DECREF(app);
    return result;
}

PyDoc_STRVAR(setup_doc,
             "setup(perf_counter, environ_error_key, middleware_type, recording_class,\n"
             "      collector_type, context_var, get_context, empty_context, has_current_span,\n"
             "      instrumented_flag, environ_collector_key, provider_globals, /)\n--\n\n"
             "What a request needs from upstream_ops.wsgi: the clock of its timestamps, the environ\n"
             "key of an app's error, the classes, the Collector's ContextVar, OpenTelemetry's\n"
             "context test, and the namespaces of the API's global providers (or None). Before it,\n"
             "call() hands every request to the Python code.");

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "setup expected 12 arguments, got %zd", nargs);
        return NULL;
    }
    if (!PyCallable_Check(args[0]) || !PyUnicode_Check(args[1]) || !PyType_Check(args[2]) ||
        !PyType_Check(args[3]) || !PyType_IsSubtype((PyTypeObject *)args[3], &RecordingType) ||
        !PyType_Check(args[4]) || !PyContextVar_CheckExact(args[5]) ||
        !PyCallable_Check(args[6]) || !PyCallable_Check(args[8]) || !PyUnicode_Check(args[9]) ||
        !PyUnicode_Check(args[10]) || !provider_globals_valid(args[11])) {
        PyErr_SetString(PyExc_TypeError,
                        "setup expects a clock, a str, two classes (the second a subclass of "
                        "Recording), a class, a ContextVar, a callable, any object, a callable, "
                        "two str, and two dicts or None");
        return NULL;
    }
    PyObject **fields[11] = {&perf_counter,     &environ_error_key, &middleware_type,
                             &recording_class,  &collector_type,    &current_var,
                             &get_context,      &empty_context,     &has_current_span,
                             &instrumented_flag, &environ_collector_key};
    for (int i = 0; i < 11; i++) {
        Py_XSETREF(*fields[i], Py_NewRef(args[i]));
    }
    set_provider_globals(args[11]);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"new_recording", (PyCFunction)(void (*)(void))new_recording, METH_FASTCALL,
     new_recording_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, call_doc},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&close_name, "close"},
        {&finish_slow_name, "_finish_slow"},
        {&start_response_slow_name, "_start_response_slow"},
        {&app_name, "app"},
        {&serve_name, "_serve"},
        {&default_rule_name, "_default_rule"},
        {&echo_header_name, "_echo_header"},
        {&environ_key_name, "_environ_key"},
        {&fail_name, "fail"},
        {&file_wrapper_key, "wsgi.file_wrapper"},
        {&instrumented_app_name, "_instrumented_app"},
        {&live_name, "_live"},
        {&max_events_name, "max_events"},
        {&recorder_name, "recorder"},
        {&route_key_name, "_route_key"},
        {&start_response_name, "start_response"},
        {&valid_request_id_name, "valid_request_id"},
        {&wrap_close_of_name, "wrap_close_of"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].name == NULL) {
            *names[i].name = PyUnicode_InternFromString(names[i].text);
            if (*names[i].name == NULL) {
                return -1;
            }
        }
    }
    if (collector_steps_ready() < 0) {
        return -1;
    }
    if (PyType_Ready(&RecordingType) < 0) {
        return -1;
    }
    Py_INCREF(&RecordingType);
    if (PyModule_AddObject(module, "Recording", (PyObject *)&RecordingType) < 0) {
        Py_DECREF(&RecordingType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef wsgi_recording_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "upstream_ops._wsgi_recording",
    .m_doc = "Optional speed-up in C: the WSGI middleware's object for one request.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__wsgi_recording(void)
{
    return PyModuleDef_Init(&wsgi_recording_module);
}
