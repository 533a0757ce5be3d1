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

static PyObject *Recording_new(PyTypeObject *type, PyObject *args, PyObject *kwds);

PyDoc_STRVAR(new_recording_doc,
             "new_recording(cls, middleware, environ, start_response, collector, telemetry, "
             "started, context_var, token, route_key, no_echo, default_rule, /)\n--\n\n"
             "A new cls (a subclass of Recording) for one request, in one call.");

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
    /* Recording's own __new__, not the class's: a subclass's __new__ would want arguments. */
    PyObject *made = Recording_new((PyTypeObject *)cls, NULL, NULL);
    if (made == NULL) {
        return NULL;
    }
    Recording *self = (Recording *)made;
    set_field(&self->middleware, args[1]);
    set_field(&self->environ, args[2]);
    set_field(&self->start_response_of_server, args[3]);
    set_field(&self->collector, args[4]);
    set_field(&self->telemetry, args[5]);
    self->started = started;
    set_field(&self->context_var, args[7]);
    set_field(&self->token, args[8]);
    set_field(&self->route_key, args[9]);
    self->no_echo = (char)PyObject_IsTrue(args[10]);
    self->default_rule = (char)PyObject_IsTrue(args[11]);
    if (self->no_echo < 0 || self->default_rule < 0) {
        Py_DECREF(made);
        return NULL;
    }
    return made;
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
        PyObject *quiet = PyObject_CallMethodNoArgs(self->collector, close_name);
        if (quiet == NULL) {
            Py_DECREF(error);
            return NULL;
        }
        int is_quiet = PyObject_IsTrue(quiet);
        Py_DECREF(quiet);
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
                PyObject *t2, *v2, *tb2;
                PyErr_Fetch(&t2, &v2, &tb2);
                PyErr_NormalizeException(&t2, &v2, &tb2);
                if (v2 != NULL && value != NULL) {
                    PyException_SetContext(v2, Py_NewRef(value));
                }
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(traceback);
                PyErr_Restore(t2, v2, tb2);
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

PyDoc_STRVAR(setup_doc,
             "setup(perf_counter, environ_error_key, /)\n--\n\n"
             "The clock of the request's timestamps and the environ key of an app's error.");

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup expects a clock and a str");
        return NULL;
    }
    Py_XSETREF(perf_counter, Py_NewRef(args[0]));
    Py_XSETREF(environ_error_key, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"new_recording", (PyCFunction)(void (*)(void))new_recording, METH_FASTCALL,
     new_recording_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
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
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].name == NULL) {
            *names[i].name = PyUnicode_InternFromString(names[i].text);
            if (*names[i].name == NULL) {
                return -1;
            }
        }
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
