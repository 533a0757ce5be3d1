/* Optional speed-up in C: one HTTP request through the ASGI middleware (upstream_ops.asgi).

   In Python every request costs the middleware a Collector, a per-request object with its own
   __init__, a coroutine for each message the app sends and the record rule at the end; under
   uvicorn that was 6-14 us of a 100 us request. Call does the same steps in C:

   * new_call(cls, middleware, scope, receive, send) begins the request (the clock, the incoming
     request id, the Collector in scope["state"] and in its ContextVar, whether OpenTelemetry is
     live), calls the app and returns the Call, which the middleware awaits at once;
   * awaiting the Call drives the app's awaitable; send_message and receive_message (what the app
     gets as send and receive) note the status, the end of the response and a disconnect;
   * when the app is done, a healthy request under the default rule ends there; any other goes on
     to the Python methods of the subclass (_begin_slow, _request_id_from, _finish_slow).

   A Guard is what send_message and receive_message return while the response is under way: it
   awaits the server's awaitable and notes a disconnect (an OSError from send, an http.disconnect
   from receive). tests/test_asgi.py runs every test with Call and with the Python code alone.

   Built when a C compiler is there (setup.py marks it optional). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_collector_steps.h"

/* --- names and the objects setup() gives ------------------------------------------------------ */

static PyObject *perf_counter = NULL;
static PyObject *current_var = NULL; /* upstream_ops.collector._current */
static PyObject *with_header = NULL;

static PyObject *s_type, *s_status, *s_more_body, *s_headers, *s_state, *s_upstream_ops,
    *s_root_path, *s_empty, *s_start, *s_body, *s_pathsend, *s_zerocopysend, *s_disconnect,
    *s_app, *s_recorder, *s_max_events, *s_default_rule, *s_incoming_header_name, *s_header_name,
    *s_live, *s_close, *s_throw, *s_response_ready,
    *s_begin_slow, *s_request_id_from, *s_finish_slow, *s_value, *s_zero, *s_five_hundred;

static PyTypeObject CallType;
static PyTypeObject GuardType;

typedef struct {
    PyObject_HEAD
    PyObject *middleware;
    PyObject *scope;
    PyObject *receive_of_server;
    PyObject *send_of_server;
    PyObject *collector;
    PyObject *telemetry; /* None, or the request's RequestTelemetry */
    PyObject *otel_token;
    PyObject *header; /* None, or the (name, value) of the echoed request id */
    PyObject *root_path;
    PyObject *status_code;
    PyObject *token; /* of the Collector's ContextVar */
    PyObject *inner; /* the app's awaitable, as an iterator, until it is done */
    double started;
    double response_ended_at;
    char response_complete;
    char disconnected;
    char ended; /* the request's end has run */
} Call;

typedef struct {
    PyObject_HEAD
    Call *owner;
    PyObject *inner;
    char is_receive;
} Guard;

/* --- small helpers ---------------------------------------------------------------------------- */

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

static inline void
set_field(PyObject **field, PyObject *value)
{
    Py_XINCREF(value);
    Py_XSETREF(*field, value);
}

/* getattr(obj, name, None) without making the AttributeError. */
static inline int
lookup_attr(PyObject *obj, PyObject *name, PyObject **found)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, found);
#else
    return _PyObject_LookupAttr(obj, name, found);
#endif
}

/* mapping.get(key) as a new reference, or NULL with no error when the key is missing. */
static PyObject *
get_item(PyObject *mapping, PyObject *key)
{
    if (PyDict_CheckExact(mapping)) {
        PyObject *found = PyDict_GetItemWithError(mapping, key);
        return Py_XNewRef(found);
    }
    PyObject *found = PyObject_GetItem(mapping, key);
    if (found == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return found;
}

/* The exception being raised, normalized and with its traceback, as a new reference; cleared. */
static PyObject *
take_error(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (type == NULL) {
        return PyObject_CallOneArg(PyExc_SystemError, s_empty);
    }
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

/* Raises error again (a reference stolen). */
static void
raise_error(PyObject *error)
{
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, PyException_GetTraceback(error));
}

/* The error now being raised gets cause_of_context as its __context__ (a reference stolen), as an
   exception raised in a finally block does. */
static void
chain_error(PyObject *context)
{
    PyObject *error = take_error();
    if (error != NULL && error != context) {
        PyException_SetContext(error, context);
    }
    else {
        Py_DECREF(context);
    }
    if (error != NULL) {
        raise_error(error);
    }
}

/* What `await obj` iterates: obj itself for a coroutine, else obj.__await__(). */
static PyObject *
awaitable_iter(PyObject *obj)
{
    if (PyCoro_CheckExact(obj) || PyGen_CheckExact(obj)) {
        return Py_NewRef(obj);
    }
    PyAsyncMethods *methods = Py_TYPE(obj)->tp_as_async;
    if (methods != NULL && methods->am_await != NULL) {
        PyObject *iterator = methods->am_await(obj);
        if (iterator == NULL) {
            return NULL;
        }
        if (PyCoro_CheckExact(iterator) || !PyIter_Check(iterator)) {
            PyErr_Format(PyExc_TypeError, "__await__() returned a non-iterator of type '%.100s'",
                         Py_TYPE(iterator)->tp_name);
            Py_DECREF(iterator);
            return NULL;
        }
        return iterator;
    }
    PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                 Py_TYPE(obj)->tp_name);
    return NULL;
}

/* The value of the StopIteration being raised, as a new reference (None without one); cleared. */
static PyObject *
take_stop_value(void)
{
    PyObject *error = take_error();
    if (error == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_GetAttr(error, s_value);
    Py_DECREF(error);
    return value;
}

/* Forwards throw(*args) to iterator's throw, or raises what was thrown when it has none. */
static PyObject *
throw_into(PyObject *iterator, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *stack[4] = {iterator, args[0], nargs > 1 ? args[1] : NULL,
                          nargs > 2 ? args[2] : NULL};
    return PyObject_VectorcallMethod(s_throw, stack, (size_t)(nargs + 1), NULL);
}

/* Closes iterator, if it can be closed; -1 with the error of its close. */
static int
close_iterator(PyObject *iterator)
{
    PyObject *close;
    if (lookup_attr(iterator, s_close, &close) < 0) {
        return -1;
    }
    if (close == NULL) {
        return 0;
    }
    PyObject *answer = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    if (answer == NULL) {
        return -1;
    }
    Py_DECREF(answer);
    return 0;
}

static int
is_generator_exit(PyObject *thrown)
{
    return PyErr_GivenExceptionMatches(thrown, PyExc_GeneratorExit);
}

/* What send(value) and __next__ answer after an am_send: the value yielded, or NULL with the
   StopIteration of the value returned (none made for None from __next__) or the error. */
static PyObject *
sent(PySendResult result, PyObject *value, int from_next)
{
    if (result == PYGEN_NEXT) {
        return value;
    }
    if (result == PYGEN_RETURN) {
        if (value == Py_None && from_next) {
            Py_DECREF(value);
            return NULL;
        }
        PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
        Py_DECREF(value);
        if (stop != NULL) {
            PyErr_SetObject(PyExc_StopIteration, stop);
            Py_DECREF(stop);
        }
    }
    return NULL;
}

/* send(arg) or __next__ (from_next) of an object whose am_send is step. */
static PyObject *
send_with(sendfunc step, PyObject *self, PyObject *arg, int from_next)
{
    PyObject *value;
    PySendResult result = step(self, arg, &value);
    return sent(result, value, from_next);
}

/* --- the end of the request ------------------------------------------------------------------- */

/* Whether status_code < 500, as Python compares it; -1 with an error. */
static int
below_500(PyObject *status_code)
{
    if (PyLong_CheckExact(status_code)) {
        long code = PyLong_AsLong(status_code);
        if (code == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyObject_RichCompareBool(status_code, s_five_hundred, Py_LT);
        }
        return code < 500;
    }
    return PyObject_RichCompareBool(status_code, s_five_hundred, Py_LT);
}

/* The request is over (error: what the app raised, borrowed, or NULL): the Collector's ContextVar
   is reset, a healthy request under the default rule ends here and any other goes on to
   _finish_slow. Runs once; -1 with an error. */
static int
call_end(Call *self, PyObject *error)
{
    if (self->ended) {
        return 0;
    }
    self->ended = 1;
    Py_CLEAR(self->inner);
    if (self->token != NULL) {
        PyObject *token = self->token;
        self->token = NULL;
        int reset = PyContextVar_Reset(current_var, token);
        Py_DECREF(token);
        if (reset < 0) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
                return -1;
            }
            PyErr_Clear(); /* the app left another context current: none of ours stays */
            PyObject *none_token = PyContextVar_Set(current_var, Py_None);
            if (none_token == NULL) {
                return -1;
            }
            Py_DECREF(none_token);
        }
    }
    int known_unhealthy = 0;
    if (self->response_complete && error == NULL && self->telemetry == Py_None) {
        /* Recorder.finish_if_healthy without its call; the collector is closed either way. */
        int is_quiet = quiet_close(self->collector);
        if (is_quiet < 0) {
            return -1;
        }
        if (is_quiet) {
            PyObject *recorder = PyObject_GetAttr(self->middleware, s_recorder);
            if (recorder == NULL) {
                return -1;
            }
            int default_rule = attr_is_true(recorder, s_default_rule);
            Py_DECREF(recorder);
            if (default_rule < 0) {
                return -1;
            }
            if (default_rule) {
                int healthy = below_500(self->status_code);
                if (healthy != 0) {
                    return healthy < 0 ? -1 : 0;
                }
            }
        }
        known_unhealthy = 1;
    }
    PyObject *stack[3] = {(PyObject *)self, error != NULL ? error : Py_None,
                          known_unhealthy ? Py_True : Py_False};
    PyObject *answer = PyObject_VectorcallMethod(s_finish_slow, stack, 3, NULL);
    if (answer == NULL) {
        return -1;
    }
    Py_DECREF(answer);
    return 0;
}

/* The app's awaitable has stopped (result: PYGEN_RETURN or PYGEN_ERROR): the request ends, and the
   app's error, if any, is raised again (with an error of the end chained to it). */
static PySendResult
call_stopped(Call *self, PySendResult result, PyObject **value)
{
    if (result == PYGEN_RETURN) {
        Py_CLEAR(*value);
        if (call_end(self, NULL) < 0) {
            return PYGEN_ERROR;
        }
        *value = Py_NewRef(Py_None);
        return PYGEN_RETURN;
    }
    *value = NULL;
    PyObject *error = take_error();
    if (error == NULL) {
        return PYGEN_ERROR;
    }
    if (call_end(self, error) < 0) {
        chain_error(error);
    }
    else {
        raise_error(error);
    }
    return PYGEN_ERROR;
}

/* --- Call: awaiting it drives the app --------------------------------------------------------- */

static PySendResult
Call_am_send(Call *self, PyObject *arg, PyObject **value)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *value = NULL;
        return PYGEN_ERROR;
    }
    PySendResult result = PyIter_Send(self->inner, arg, value);
    if (result == PYGEN_NEXT) {
        return result;
    }
    return call_stopped(self, result, value);
}

static PyObject *
Call_iternext(Call *self)
{
    return send_with((sendfunc)Call_am_send, (PyObject *)self, Py_None, 1);
}

/* Python's subclass of Call does not inherit am_send before 3.12: a value other than None (trio
   sends its results in) comes through this method. */
static PyObject *
Call_send(Call *self, PyObject *arg)
{
    return send_with((sendfunc)Call_am_send, (PyObject *)self, arg, 0);
}

static PyObject *
Call_await(Call *self)
{
    return Py_NewRef(self);
}

/* Raises what throw(*args) was given, as Python's throw does with its arguments. */
static void
raise_thrown(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *thrown = args[0];
    if (PyExceptionInstance_Check(thrown)) {
        PyErr_SetObject((PyObject *)Py_TYPE(thrown), thrown);
    }
    else if (PyExceptionClass_Check(thrown)) {
        PyErr_SetObject(thrown, nargs > 1 && args[1] != Py_None ? args[1] : NULL);
    }
    else {
        PyErr_SetString(PyExc_TypeError,
                        "exceptions must be classes or instances deriving from BaseException");
    }
}

static PyObject *
Call_throw(Call *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    if (self->inner == NULL) {
        raise_thrown(args, nargs);
        return NULL;
    }
    PyObject *inner = Py_NewRef(self->inner);
    PyObject *value;
    if (is_generator_exit(args[0])) {
        /* As Python does for the iterator it awaits: close it, then GeneratorExit is raised at
           the await (or what the close raised). */
        int closed = close_iterator(inner);
        Py_DECREF(inner);
        if (closed == 0) {
            raise_thrown(args, nargs);
        }
        (void)call_stopped(self, PYGEN_ERROR, &value);
        return NULL;
    }
    PyObject *yielded = throw_into(inner, args, nargs);
    Py_DECREF(inner);
    if (yielded != NULL) {
        return yielded;
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        /* The app returned: the request ends as after a send that returned. */
        PyErr_Clear();
        if (call_end(self, NULL) < 0) {
            return NULL;
        }
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    (void)call_stopped(self, PYGEN_ERROR, &value);
    return NULL;
}

static PyObject *
Call_close(Call *self, PyObject *Py_UNUSED(ignored))
{
    if (self->inner == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *inner = Py_NewRef(self->inner);
    int closed = close_iterator(inner);
    Py_DECREF(inner);
    PyObject *error = closed < 0 ? take_error() : PyObject_CallNoArgs(PyExc_GeneratorExit);
    if (error == NULL) {
        return NULL;
    }
    if (call_end(self, error) < 0) {
        chain_error(error);
        return NULL;
    }
    if (closed < 0) {
        raise_error(error);
        return NULL;
    }
    Py_DECREF(error);
    Py_RETURN_NONE;
}

static void
Call_finalize(Call *self)
{
    if (self->inner == NULL) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *answer = Call_close(self, NULL);
    if (answer == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    else {
        Py_DECREF(answer);
    }
    PyErr_Restore(type, value, traceback);
}

/* --- the app's send and receive -------------------------------------------------------------- */

static PyObject *new_guard(Call *owner, PyObject *awaitable, char is_receive);

static int
equals(PyObject *kind, PyObject *name)
{
    if (kind == name) {
        return 1;
    }
    if (PyUnicode_CheckExact(kind)) {
        return PyUnicode_Compare(kind, name) == 0;
    }
    return PyObject_RichCompareBool(kind, name, Py_EQ);
}

static int
is_body_message(PyObject *kind)
{
    PyObject *kinds[3] = {s_body, s_pathsend, s_zerocopysend};
    for (int i = 0; i < 3; i++) {
        int equal = equals(kind, kinds[i]);
        if (equal != 0) {
            return equal;
        }
    }
    return 0;
}

static PyObject *
Call_send_message(Call *self, PyObject *message)
{
    PyObject *kind = PyObject_GetItem(message, s_type);
    if (kind == NULL) {
        return NULL;
    }
    PyObject *to_send = Py_NewRef(message);
    int is_start = equals(kind, s_start);
    if (is_start < 0) {
        goto failed;
    }
    if (is_start) {
        PyObject *status = get_item(message, s_status);
        if (status == NULL && PyErr_Occurred()) {
            goto failed;
        }
        Py_XSETREF(self->status_code, status != NULL ? status : Py_NewRef(s_zero));
        if (self->header != Py_None && self->header != NULL) {
            PyObject *with = PyObject_CallFunctionObjArgs(with_header, message, self->header, NULL);
            if (with == NULL) {
                goto failed;
            }
            Py_SETREF(to_send, with);
        }
    }
    else {
        int is_body = is_body_message(kind);
        if (is_body < 0) {
            goto failed;
        }
        if (is_body) {
            PyObject *more = get_item(message, s_more_body);
            if (more == NULL && PyErr_Occurred()) {
                goto failed;
            }
            int more_body = more != NULL ? PyObject_IsTrue(more) : 0;
            Py_XDECREF(more);
            if (more_body < 0) {
                goto failed;
            }
            if (!more_body) {
                self->response_complete = 1;
                self->response_ended_at = now();
                if (self->telemetry != Py_None && self->telemetry != NULL) {
                    /* FastAPI's own telemetry ends its server span while this message is sent. */
                    PyObject *answer = PyObject_CallMethodOneArg(
                        self->telemetry, s_response_ready, self->status_code);
                    if (answer == NULL) {
                        goto failed;
                    }
                    Py_DECREF(answer);
                }
            }
        }
    }
    Py_DECREF(kind);
    PyObject *awaitable = PyObject_CallOneArg(self->send_of_server, to_send);
    Py_DECREF(to_send);
    if (awaitable == NULL || self->response_complete) {
        return awaitable; /* a disconnect cannot change the status of a complete response */
    }
    PyObject *guard = new_guard(self, awaitable, 0);
    Py_DECREF(awaitable);
    return guard;
failed:
    Py_DECREF(kind);
    Py_DECREF(to_send);
    return NULL;
}

static PyObject *
Call_receive_message(Call *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *awaitable = PyObject_CallNoArgs(self->receive_of_server);
    if (awaitable == NULL) {
        return NULL;
    }
    PyObject *guard = new_guard(self, awaitable, 1);
    Py_DECREF(awaitable);
    return guard;
}

static PyMethodDef send_message_def = {
    "send_message", (PyCFunction)Call_send_message, METH_O,
    "The app's send: notes the status and the end of the response, then calls the server's."};
static PyMethodDef receive_message_def = {
    "receive_message", (PyCFunction)Call_receive_message, METH_NOARGS,
    "The app's receive: the server's, noting a disconnect before the response is complete."};

/* --- Guard: the server's awaitable, noting a disconnect -------------------------------------- */

/* After receive returned message: an http.disconnect before the response was complete. */
static int
guard_received(Guard *self, PyObject *message)
{
    PyObject *kind = PyObject_GetItem(message, s_type);
    if (kind == NULL) {
        return -1;
    }
    int is_disconnect = equals(kind, s_disconnect);
    Py_DECREF(kind);
    if (is_disconnect < 0) {
        return -1;
    }
    if (is_disconnect && !self->owner->response_complete) {
        self->owner->disconnected = 1;
    }
    return 0;
}

/* After the server's send raised: an OSError before the response was complete. */
static void
guard_send_failed(Guard *self)
{
    if (!self->is_receive && PyErr_ExceptionMatches(PyExc_OSError) &&
        !self->owner->response_complete) {
        self->owner->disconnected = 1;
    }
}

static PyObject *
new_guard(Call *owner, PyObject *awaitable, char is_receive)
{
    PyObject *iterator = awaitable_iter(awaitable);
    if (iterator == NULL) {
        return NULL;
    }
    Guard *self = PyObject_GC_New(Guard, &GuardType);
    if (self == NULL) {
        Py_DECREF(iterator);
        return NULL;
    }
    self->owner = (Call *)Py_NewRef(owner);
    self->inner = iterator;
    self->is_receive = is_receive;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PySendResult
Guard_am_send(Guard *self, PyObject *arg, PyObject **value)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *value = NULL;
        return PYGEN_ERROR;
    }
    PySendResult result = PyIter_Send(self->inner, arg, value);
    if (result == PYGEN_NEXT) {
        return result;
    }
    Py_CLEAR(self->inner);
    if (result == PYGEN_ERROR) {
        guard_send_failed(self);
        return result;
    }
    if (self->is_receive && guard_received(self, *value) < 0) {
        Py_CLEAR(*value);
        return PYGEN_ERROR;
    }
    return result;
}

static PyObject *
Guard_iternext(Guard *self)
{
    return send_with((sendfunc)Guard_am_send, (PyObject *)self, Py_None, 1);
}

static PyObject *
Guard_send(Guard *self, PyObject *arg)
{
    return send_with((sendfunc)Guard_am_send, (PyObject *)self, arg, 0);
}

static PyObject *
Guard_await(Guard *self)
{
    return Py_NewRef(self);
}

static PyObject *
Guard_throw(Guard *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return NULL;
    }
    PyObject *inner = Py_NewRef(self->inner);
    PyObject *yielded = throw_into(inner, args, nargs);
    Py_DECREF(inner);
    if (yielded != NULL) {
        return yielded;
    }
    Py_CLEAR(self->inner);
    if (self->is_receive && PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *message = take_stop_value();
        if (message == NULL) {
            return NULL;
        }
        if (guard_received(self, message) == 0) {
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, message);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(message);
        return NULL;
    }
    guard_send_failed(self);
    return NULL;
}

static PyObject *
Guard_close(Guard *self, PyObject *Py_UNUSED(ignored))
{
    if (self->inner == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *inner = self->inner;
    self->inner = NULL;
    int closed = close_iterator(inner);
    Py_DECREF(inner);
    if (closed < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
Guard_traverse(Guard *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->inner);
    return 0;
}

static int
Guard_clear(Guard *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->inner);
    return 0;
}

static void
Guard_dealloc(Guard *self)
{
    PyObject_GC_UnTrack(self);
    Guard_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef Guard_methods[] = {
    {"send", (PyCFunction)Guard_send, METH_O, "Sends a value into the server's awaitable."},
    {"throw", (PyCFunction)(void (*)(void))Guard_throw, METH_FASTCALL,
     "Throws into the server's awaitable."},
    {"close", (PyCFunction)Guard_close, METH_NOARGS, "Closes the server's awaitable."},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods Guard_async = {
    .am_await = (unaryfunc)Guard_await,
    .am_send = (sendfunc)Guard_am_send,
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "upstream_ops._asgi_recording.Guard",
    .tp_basicsize = sizeof(Guard),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The server's send or receive, awaited: notes a disconnect (see the module).",
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_traverse = (traverseproc)Guard_traverse,
    .tp_clear = (inquiry)Guard_clear,
    .tp_as_async = &Guard_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Guard_iternext,
    .tp_methods = Guard_methods,
};

/* --- the beginning of the request ------------------------------------------------------------- */

/* key == name for a header name: bytes compared directly, anything else as Python compares. */
static int
equals_bytes_or_object(PyObject *key, PyObject *name)
{
    if (PyBytes_CheckExact(key) && PyBytes_CheckExact(name)) {
        Py_ssize_t size = PyBytes_GET_SIZE(key);
        return size == PyBytes_GET_SIZE(name) &&
               memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(name), (size_t)size) == 0;
    }
    return PyObject_RichCompareBool(key, name, Py_EQ);
}

/* The incoming request id (None: none was sent, or not a valid one), as a new reference. */
static PyObject *
incoming_request_id(Call *self)
{
    PyObject *name = PyObject_GetAttr(self->middleware, s_incoming_header_name);
    if (name == NULL || name == Py_None) {
        return name;
    }
    PyObject *headers = get_item(self->scope, s_headers);
    if (headers == NULL) {
        Py_DECREF(name);
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    PyObject *found = NULL;
    PyObject *iterator = PyObject_GetIter(headers);
    Py_DECREF(headers);
    if (iterator == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *pair;
    while (found == NULL && (pair = PyIter_Next(iterator)) != NULL) {
        PyObject *key, *value;
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) {
            key = PyTuple_GET_ITEM(pair, 0);
            value = PyTuple_GET_ITEM(pair, 1);
            Py_INCREF(key);
            Py_INCREF(value);
        }
        else {
            PyObject *items = PySequence_Tuple(pair);
            if (items == NULL || PyTuple_GET_SIZE(items) != 2) {
                if (items != NULL) {
                    PyErr_Format(PyExc_ValueError, "expected 2 values to unpack, got %zd",
                                 PyTuple_GET_SIZE(items));
                    Py_DECREF(items);
                }
                Py_DECREF(pair);
                break;
            }
            key = Py_NewRef(PyTuple_GET_ITEM(items, 0));
            value = Py_NewRef(PyTuple_GET_ITEM(items, 1));
            Py_DECREF(items);
        }
        Py_DECREF(pair);
        int equal = equals_bytes_or_object(key, name);
        Py_DECREF(key);
        if (equal < 0) {
            Py_DECREF(value);
            break;
        }
        if (equal) {
            found = PyObject_CallMethodOneArg((PyObject *)self, s_request_id_from, value);
            if (found == NULL) {
                Py_DECREF(value);
                break;
            }
        }
        Py_DECREF(value);
    }
    Py_DECREF(iterator);
    Py_DECREF(name);
    if (PyErr_Occurred()) {
        Py_XDECREF(found);
        return NULL;
    }
    return found != NULL ? found : Py_NewRef(Py_None);
}

/* Whether OpenTelemetry would record anything for this request (ServerTelemetry.start's own first
   test): the middleware's live flags, or a span current in the context. -1 with an error. */
static int
telemetry_wanted(PyObject *middleware)
{
    PyObject *live = PyObject_GetAttr(middleware, s_live);
    if (live == NULL) {
        return -1;
    }
    int wanted = live_wants(live);
    Py_DECREF(live);
    return wanted != 0 ? wanted : span_is_current();
}

/* The beginning of the request, up to the app's awaitable; -1 with an error (after the request's
   end has run when the app was called). */
static int
call_begin(Call *self)
{
    PyObject *request_id = incoming_request_id(self);
    if (request_id == NULL) {
        return -1;
    }
    PyObject *recorder = PyObject_GetAttr(self->middleware, s_recorder);
    if (recorder == NULL) {
        Py_DECREF(request_id);
        return -1;
    }
    PyObject *max_events = PyObject_GetAttr(recorder, s_max_events);
    Py_DECREF(recorder);
    if (max_events == NULL) {
        Py_DECREF(request_id);
        return -1;
    }
    PyObject *collector = make_collector(request_id, max_events);
    Py_DECREF(request_id);
    Py_DECREF(max_events);
    if (collector == NULL) {
        return -1;
    }
    Py_XSETREF(self->collector, collector);

    PyObject *state = get_item(self->scope, s_state);
    if (state == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        PyObject *fresh = PyDict_New();
        if (fresh == NULL || PyDict_SetItem(fresh, s_upstream_ops, collector) < 0 ||
            PyObject_SetItem(self->scope, s_state, fresh) < 0) {
            Py_XDECREF(fresh);
            return -1;
        }
        Py_DECREF(fresh);
    }
    else {
        int failed = PyDict_Check(state) && PyDict_SetItem(state, s_upstream_ops, collector) < 0;
        Py_DECREF(state);
        if (failed) {
            return -1;
        }
    }

    int wanted = telemetry_wanted(self->middleware);
    if (wanted < 0) {
        return -1;
    }
    PyObject *header_name = PyObject_GetAttr(self->middleware, s_header_name);
    if (header_name == NULL) {
        return -1;
    }
    int echo = header_name != Py_None;
    Py_DECREF(header_name);
    if (wanted || echo) {
        /* Starts the telemetry and makes the echoed header, in Python. */
        PyObject *answer = PyObject_CallMethodOneArg((PyObject *)self, s_begin_slow,
                                                     wanted ? Py_True : Py_False);
        if (answer == NULL) {
            return -1;
        }
        Py_DECREF(answer);
    }

    PyObject *root_path = get_item(self->scope, s_root_path);
    if (root_path == NULL && PyErr_Occurred()) {
        return -1;
    }
    Py_XSETREF(self->root_path, root_path != NULL ? root_path : Py_NewRef(s_empty));

    PyObject *app = PyObject_GetAttr(self->middleware, s_app);
    if (app == NULL) {
        return -1;
    }
    PyObject *token = PyContextVar_Set(current_var, self->collector);
    if (token == NULL) {
        Py_DECREF(app);
        return -1;
    }
    Py_XSETREF(self->token, token);

    /* From here on the request's end runs whatever happens, as after the middleware's try. */
    PyObject *inner = NULL;
    PyObject *receive = PyCFunction_New(&receive_message_def, (PyObject *)self);
    PyObject *send = receive != NULL ? PyCFunction_New(&send_message_def, (PyObject *)self) : NULL;
    if (send != NULL) {
        PyObject *app_args[3] = {self->scope, receive, send};
        PyObject *awaitable = PyObject_Vectorcall(app, app_args, 3, NULL);
        if (awaitable != NULL) {
            inner = awaitable_iter(awaitable);
            Py_DECREF(awaitable);
        }
    }
    Py_DECREF(app);
    Py_XDECREF(receive);
    Py_XDECREF(send);
    if (inner == NULL) {
        PyObject *value;
        (void)call_stopped(self, PYGEN_ERROR, &value);
        return -1;
    }
    Py_XSETREF(self->inner, inner);
    return 0;
}

/* --- the type --------------------------------------------------------------------------------- */

static int
Call_traverse(Call *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->scope);
    Py_VISIT(self->receive_of_server);
    Py_VISIT(self->send_of_server);
    Py_VISIT(self->collector);
    Py_VISIT(self->telemetry);
    Py_VISIT(self->otel_token);
    Py_VISIT(self->header);
    Py_VISIT(self->root_path);
    Py_VISIT(self->status_code);
    Py_VISIT(self->token);
    Py_VISIT(self->inner);
    return 0;
}

static int
Call_clear(Call *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive_of_server);
    Py_CLEAR(self->send_of_server);
    Py_CLEAR(self->collector);
    Py_CLEAR(self->telemetry);
    Py_CLEAR(self->otel_token);
    Py_CLEAR(self->header);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->status_code);
    Py_CLEAR(self->token);
    Py_CLEAR(self->inner);
    return 0;
}

static void
Call_dealloc(Call *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* the finalizer made it live again */
    }
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Call_clear(self);
    type->tp_free((PyObject *)self); /* a subclass's reference is dropped by its own dealloc */
}

static PyObject *
Call_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    PyErr_Format(PyExc_TypeError, "%.100s is made by new_call", type->tp_name);
    return NULL;
}

PyDoc_STRVAR(new_call_doc,
             "new_call(cls, middleware, scope, receive, send, /)\n--\n\n"
             "Begins one HTTP request through middleware and calls its app: a cls (a subclass of "
             "Call) to await at once.");

static PyObject *
new_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "new_call expected 5 arguments, got %zd", nargs);
        return NULL;
    }
    if (perf_counter == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "upstream_ops._asgi_recording.setup was not called");
        return NULL;
    }
    PyObject *cls = args[0];
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &CallType)) {
        PyErr_SetString(PyExc_TypeError, "new_call expects a subclass of Call first");
        return NULL;
    }
    Call *self = (Call *)((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 0);
    if (self == NULL) {
        return NULL;
    }
    self->started = now();
    self->middleware = Py_NewRef(args[1]);
    self->scope = Py_NewRef(args[2]);
    self->receive_of_server = Py_NewRef(args[3]);
    self->send_of_server = Py_NewRef(args[4]);
    self->telemetry = Py_NewRef(Py_None);
    self->otel_token = Py_NewRef(Py_None);
    self->header = Py_NewRef(Py_None);
    self->status_code = Py_NewRef(s_zero);
    if (call_begin(self) < 0) {
        self->ended = 1;
        Py_CLEAR(self->inner);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef Call_methods[] = {
    {"send", (PyCFunction)Call_send, METH_O, "Sends a value into the app's awaitable."},
    {"throw", (PyCFunction)(void (*)(void))Call_throw, METH_FASTCALL,
     "Throws into the app's awaitable; the request ends when it stops."},
    {"close", (PyCFunction)Call_close, METH_NOARGS,
     "Closes the app's awaitable and ends the request, as closing a coroutine does."},
    {NULL, NULL, 0, NULL},
};

#define OBJECT_MEMBER(name, field, flags) {name, T_OBJECT, offsetof(Call, field), flags, NULL}

static PyMemberDef Call_members[] = {
    OBJECT_MEMBER("middleware", middleware, READONLY),
    OBJECT_MEMBER("scope", scope, READONLY),
    OBJECT_MEMBER("collector", collector, READONLY),
    OBJECT_MEMBER("telemetry", telemetry, 0),
    OBJECT_MEMBER("otel_token", otel_token, 0),
    OBJECT_MEMBER("_header", header, 0),
    OBJECT_MEMBER("root_path", root_path, READONLY),
    OBJECT_MEMBER("status_code", status_code, READONLY),
    {"started", T_DOUBLE, offsetof(Call, started), READONLY, NULL},
    {"response_ended_at", T_DOUBLE, offsetof(Call, response_ended_at), READONLY, NULL},
    {"response_complete", T_BOOL, offsetof(Call, response_complete), READONLY, NULL},
    {"disconnected", T_BOOL, offsetof(Call, disconnected), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyAsyncMethods Call_async = {
    .am_await = (unaryfunc)Call_await,
    .am_send = (sendfunc)Call_am_send,
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "upstream_ops._asgi_recording.Call",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One HTTP request through the ASGI middleware, awaited once (see the module).",
    .tp_new = Call_new,
    .tp_dealloc = (destructor)Call_dealloc,
    .tp_finalize = (destructor)Call_finalize,
    .tp_traverse = (traverseproc)Call_traverse,
    .tp_clear = (inquiry)Call_clear,
    .tp_as_async = &Call_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Call_iternext,
    .tp_methods = Call_methods,
    .tp_members = Call_members,
};

/* --- the module ------------------------------------------------------------------------------- */

PyDoc_STRVAR(setup_doc,
             "setup(perf_counter, collector_class, current_var, get_context, empty_context, "
             "has_current_span, with_header, provider_globals, /)\n--\n\n"
             "What a request needs from the Python modules: the clock, the Collector and its "
             "ContextVar, OpenTelemetry's context test, the echoed header's helper and the "
             "namespaces of the API's global providers (or None).");

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "setup expected 8 arguments, got %zd", nargs);
        return NULL;
    }
    if (!PyCallable_Check(args[0]) || !PyType_Check(args[1]) ||
        !PyContextVar_CheckExact(args[2]) || !PyCallable_Check(args[3]) ||
        !PyCallable_Check(args[5]) || !PyCallable_Check(args[6]) ||
        !provider_globals_valid(args[7])) {
        PyErr_SetString(PyExc_TypeError,
                        "setup expects callables (a class second), a ContextVar third, any object "
                        "sixth and two dicts or None last");
        return NULL;
    }
    PyObject **fields[7] = {&perf_counter, &collector_type, &current_var, &get_context,
                            &empty_context, &has_current_span, &with_header};
    for (int i = 0; i < 7; i++) {
        Py_XSETREF(*fields[i], Py_NewRef(args[i]));
    }
    set_provider_globals(args[7]);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"new_call", (PyCFunction)(void (*)(void))new_call, METH_FASTCALL, new_call_doc},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{    if (collector_steps_ready() < 0) {
        return -1;
    }

    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&s_type, "type"},
        {&s_status, "status"},
        {&s_more_body, "more_body"},
        {&s_headers, "headers"},
        {&s_state, "state"},
        {&s_upstream_ops, "upstream_ops"},
        {&s_root_path, "root_path"},
        {&s_empty, ""},
        {&s_start, "http.response.start"},
        {&s_body, "http.response.body"},
        {&s_pathsend, "http.response.pathsend"},
        {&s_zerocopysend, "http.response.zerocopysend"},
        {&s_disconnect, "http.disconnect"},
        {&s_app, "app"},
        {&s_recorder, "recorder"},
        {&s_max_events, "max_events"},
        {&s_default_rule, "_default_rule"},
        {&s_incoming_header_name, "_incoming_header_name"},
        {&s_header_name, "_header_name"},
        {&s_live, "_live"},
        {&s_close, "close"},
        {&s_throw, "throw"},
        {&s_response_ready, "response_ready"},
        {&s_begin_slow, "_begin_slow"},
        {&s_request_id_from, "_request_id_from"},
        {&s_finish_slow, "_finish_slow"},
        {&s_value, "value"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].name == NULL) {
            *names[i].name = PyUnicode_InternFromString(names[i].text);
            if (*names[i].name == NULL) {
                return -1;
            }
        }
    }
    if (s_zero == NULL && (s_zero = PyLong_FromLong(0)) == NULL) {
        return -1;
    }
    if (s_five_hundred == NULL && (s_five_hundred = PyLong_FromLong(500)) == NULL) {
        return -1;
    }
    if (PyType_Ready(&GuardType) < 0 || PyType_Ready(&CallType) < 0) {
        return -1;
    }
    Py_INCREF(&CallType);
    if (PyModule_AddObject(module, "Call", (PyObject *)&CallType) < 0) {
        Py_DECREF(&CallType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef asgi_recording_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "upstream_ops._asgi_recording",
    .m_doc = "Optional speed-up in C: one HTTP request through the ASGI middleware.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__asgi_recording(void)
{
    return PyModuleDef_Init(&asgi_recording_module);
}
