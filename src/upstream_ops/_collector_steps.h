/* Steps on a request's Collector and OpenTelemetry's first test of a request, in C, shared by
   _wsgi_recording.c and _asgi_recording.c (each includes this file and so has its own copy of the
   state below, which its setup function fills in).

   make_collector and quiet_close do what Collector.__init__ and Collector.close do, without their
   Python frames: for a healthy request that is most of what its collector costs. live_wants and
   span_is_current are the test both middlewares make before starting telemetry (ServerTelemetry.
   start's own first test), with ProviderLiveness.refresh skipped while no global provider has
   been set (it would change nothing). The tests of both middlewares compare each with the Python
   code. */

#ifndef UPSTREAM_OPS_COLLECTOR_STEPS_H
#define UPSTREAM_OPS_COLLECTOR_STEPS_H

static PyObject *collector_type = NULL; /* upstream_ops.collector.Collector */
static PyObject *tracer_globals = NULL; /* where the API keeps its global providers, or NULL */
static PyObject *meter_globals = NULL;
static PyObject *get_context = NULL;      /* OpenTelemetry's context, read without a call chain */
static PyObject *empty_context = NULL;    /* ... and its value when nothing is attached */
static PyObject *has_current_span = NULL;

static PyObject *c_close_name, *c_dropped_events_name, *c_events_name, *c_finished_name,
    *c_listeners_name, *c_max_events_name, *c_request_id_name, *c_status_code_name,
    *c_error_message_name, *c_error_detail_name, *c_tracer_provider_name, *c_meter_provider_name,
    *c_unset_name, *c_refresh_name, *c_tracing_name, *c_metrics_name, *c_empty_tuple;

/* The names above, interned once; 0, or -1 with an error set. */
static int
collector_steps_ready(void)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&c_close_name, "close"},
        {&c_dropped_events_name, "dropped_events"},
        {&c_events_name, "_events"},
        {&c_finished_name, "_finished"},
        {&c_listeners_name, "listeners"},
        {&c_max_events_name, "_max_events"},
        {&c_request_id_name, "_request_id"},
        {&c_status_code_name, "upstream_status_code"},
        {&c_error_message_name, "upstream_error_message"},
        {&c_error_detail_name, "upstream_error_detail"},
        {&c_tracer_provider_name, "_TRACER_PROVIDER"},
        {&c_meter_provider_name, "_METER_PROVIDER"},
        {&c_unset_name, "unset"},
        {&c_refresh_name, "refresh"},
        {&c_tracing_name, "tracing"},
        {&c_metrics_name, "metrics"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].name == NULL) {
            *names[i].name = PyUnicode_InternFromString(names[i].text);
            if (*names[i].name == NULL) {
                return -1;
            }
        }
    }
    if (c_empty_tuple == NULL) {
        c_empty_tuple = PyTuple_New(0);
        if (c_empty_tuple == NULL) {
            return -1;
        }
    }
    return 0;
}

/* Whether ``globals`` is what telemetry._providers.provider_globals() gives: two dicts, or None. */
static int
provider_globals_valid(PyObject *globals)
{
    return globals == Py_None ||
           (PyTuple_Check(globals) && PyTuple_GET_SIZE(globals) == 2 &&
            PyDict_Check(PyTuple_GET_ITEM(globals, 0)) && PyDict_Check(PyTuple_GET_ITEM(globals, 1)));
}

static void
set_provider_globals(PyObject *globals)
{
    int given = globals != Py_None;
    Py_XSETREF(tracer_globals, given ? Py_NewRef(PyTuple_GET_ITEM(globals, 0)) : NULL);
    Py_XSETREF(meter_globals, given ? Py_NewRef(PyTuple_GET_ITEM(globals, 1)) : NULL);
}

/* A new reference (or NULL with an error set) as a truth value: 1, 0, or -1 with an error set. */
static int
truth_of(PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    int answer = PyObject_IsTrue(value);
    Py_DECREF(value);
    return answer;
}

/* getattr(obj, name) as a truth value: 1, 0, or -1 with an error set. */
static int
attr_is_true(PyObject *obj, PyObject *name)
{
    return truth_of(PyObject_GetAttr(obj, name));
}

/* ProviderLiveness.refresh's first test: 1 while neither global provider is set (refresh would
   return at once), 0 otherwise, -1 with an error set. */
static int
providers_unset(void)
{
    if (tracer_globals == NULL || meter_globals == NULL) {
        return 0;
    }
    PyObject *tracer = PyDict_GetItemWithError(tracer_globals, c_tracer_provider_name);
    if (tracer == NULL && PyErr_Occurred()) {
        return -1;
    }
    PyObject *meter = PyDict_GetItemWithError(meter_globals, c_meter_provider_name);
    if (meter == NULL && PyErr_Occurred()) {
        return -1;
    }
    return tracer == Py_None && meter == Py_None;
}

/* Collector(request_id, max_events) as Collector.__init__ makes it (its attributes set, the rest
   left to the class's defaults), without the Python frame of __init__: half the cost of a healthy
   request's collector. A max_events __init__ would refuse goes to the class, which raises.
   tests/test_wsgi_recording.py compares the two collectors' attributes. */
static PyObject *
make_collector(PyObject *request_id, PyObject *max_events)
{
    PyTypeObject *type = (PyTypeObject *)collector_type;
    int overflow = 0;
    if (!PyLong_CheckExact(max_events) || PyLong_AsLongAndOverflow(max_events, &overflow) < 1 ||
        overflow) {
        PyErr_Clear();
        PyObject *args[2] = {request_id, max_events};
        return PyObject_Vectorcall(collector_type, args, 2, NULL);
    }
    PyObject *self = type->tp_new(type, c_empty_tuple, NULL);
    if (self == NULL) {
        return NULL;
    }
    PyObject *listeners = PyList_New(0);
    if (listeners == NULL ||
        (request_id != Py_None && PyObject_SetAttr(self, c_request_id_name, request_id) < 0) ||
        PyObject_SetAttr(self, c_max_events_name, max_events) < 0 ||
        PyObject_SetAttr(self, c_listeners_name, listeners) < 0) {
        Py_XDECREF(listeners);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(listeners);
    return self;
}

/* collector.close() of a Collector: finished, and whether the request left nothing to record.
   1 quiet, 0 not, -1 with an error set. */
static int
quiet_close(PyObject *collector)
{
    if (collector_type == NULL || Py_TYPE(collector) != (PyTypeObject *)collector_type) {
        return truth_of(PyObject_CallMethodNoArgs(collector, c_close_name));
    }
    if (PyObject_SetAttr(collector, c_finished_name, Py_True) < 0) {
        return -1;
    }
    PyObject *truthy[] = {c_events_name, c_status_code_name, c_dropped_events_name};
    for (size_t i = 0; i < sizeof(truthy) / sizeof(truthy[0]); i++) {
        int set = attr_is_true(collector, truthy[i]);
        if (set != 0) {
            return set < 0 ? -1 : 0;
        }
    }
    PyObject *given[] = {c_error_message_name, c_error_detail_name};
    for (size_t i = 0; i < sizeof(given) / sizeof(given[0]); i++) {
        PyObject *value = PyObject_GetAttr(collector, given[i]);
        if (value == NULL) {
            return -1;
        }
        int set = value != Py_None;
        Py_DECREF(value);
        if (set) {
            return 0;
        }
    }
    return 1;
}

/* Whether a ProviderLiveness says spans or measurements would be recorded, refreshed first while
   it is unset (the middlewares' ``if live.unset: live.refresh()``). 1, 0, or -1 with an error. */
static int
live_wants(PyObject *live)
{
    int answer = attr_is_true(live, c_unset_name);
    if (answer == 1) {
        answer = providers_unset();
        if (answer == 0) {
            PyObject *done = PyObject_CallMethodNoArgs(live, c_refresh_name);
            answer = done == NULL ? -1 : 0;
            Py_XDECREF(done);
        }
        else if (answer == 1) {
            answer = 0; /* refresh would change nothing */
        }
    }
    if (answer == 0) {
        answer = attr_is_true(live, c_tracing_name);
    }
    if (answer == 0) {
        answer = attr_is_true(live, c_metrics_name);
    }
    return answer;
}

/* Whether a span, recording or not, is current: the context's variable read, and has_current_span
   asked only when something is attached. 1, 0, or -1 with an error. */
static int
span_is_current(void)
{
    PyObject *context = PyObject_CallNoArgs(get_context);
    if (context == NULL) {
        return -1;
    }
    int attached = context != empty_context;
    Py_DECREF(context);
    if (!attached) {
        return 0;
    }
    return truth_of(PyObject_CallNoArgs(has_current_span));
}

#endif /* UPSTREAM_OPS_COLLECTOR_STEPS_H */
