"""Gateway core unit tests: scheduler scenarios (routing, holding, deadlines, placer asks, timing
parts), the load meter, request validation and the warm-state listing. No I/O, explicit times."""

from __future__ import annotations

import json

import pytest

from services.gateway.core.load import LoadMeter
from services.gateway.core.errors import ApiError
from services.gateway.core.protocol import fit_to_context, parse_model_request, parse_request
from services.gateway.core.scheduler import (Abort, AskPlacer, Dispatch, InstanceSeen, Policy, Refuse, Requeue,
                                             Scheduler)
from services.gateway.core.warm import model_cards
from shared.schemas import CopyState, CopyView, InstanceState, InstanceView, ModelInfo, NodeView


def scheduler(b: int = 2, limit: int = 10, deadline_s: float = 5.0) -> Scheduler:
    return Scheduler(Policy(max_inflight=b, queue_limit=limit, queue_deadline_s=deadline_s), now_s=0.0)


def ready(instance_id: str, model: str = "m", node: str = "n0", at_s: float = 1.0, state: str = "ready"):
    return InstanceSeen(instance_id, model, node, state, at_s)


def dispatched(effects) -> list[tuple[str, str]]:
    return [(e.request_id, e.instance_id) for e in effects if isinstance(e, Dispatch)]


def test_routes_to_least_loaded_ready_instance_below_b():
    s = scheduler(b=2)
    s.observe(ready("i1"), 0)
    s.observe(ready("i2"), 0)
    s.observe(ready("i3", state="starting"), 0)
    routes = [dispatched(s.admit(f"r{k}", "m", 0)) for k in range(4)]
    assert routes == [[("r0", "i1")], [("r1", "i2")], [("r2", "i1")], [("r3", "i2")]]
    assert s.admit("r4", "m", 0) == [AskPlacer("m", 1)]  # all full: held, placer asked
    assert dispatched(s.finish("r1", 1)) == [("r4", "i2")]


def test_cold_model_asks_once_and_releases_in_arrival_order():
    s = scheduler(b=2)
    asks = [e for k in range(5) for e in s.admit(f"r{k}", "m", k * 0.1) if isinstance(e, AskPlacer)]
    assert asks == [AskPlacer("m", 1)] and s.queued("m") == 5
    assert s.placer_answered("m", True, [], 0.5) == []
    assert dispatched(s.observe(ready("i1"), 2.0)) == [("r0", "i1"), ("r1", "i1")]
    assert dispatched(s.finish("r1", 2.5)) == [("r2", "i1")]
    assert dispatched(s.finish("r0", 2.6)) == [("r3", "i1")]
    assert [e for e in s.tick(3.0) if isinstance(e, AskPlacer)] == []  # within the ask interval


def test_asks_at_most_once_per_interval_and_retries_a_failed_ask_sooner():
    s = scheduler(b=1, deadline_s=60)
    assert s.admit("r0", "m", 0) == [AskPlacer("m", 1)]
    assert s.admit("r1", "m", 1.0) == []  # still pending
    s.placer_answered("m", True, [ready("i1")], 1.1)  # a ready instance: r0 runs, r1 waits for its slot
    assert s.tick(4.9) == [] and s.tick(5.0) == [AskPlacer("m", 1)]  # still waiting after the interval
    s.placer_answered("m", False, [], 5.5)
    assert s.tick(6.0) == [] and s.tick(6.5) == [AskPlacer("m", 1)]


def test_a_model_whose_instances_all_went_asks_again_at_once():
    """The ask interval spaces out asks for one need: once the instance the last ask got stops (or
    drains), a request arriving within the interval asks at once instead of waiting it out."""
    s = scheduler(b=1, deadline_s=60)
    assert s.admit("r0", "m", 0) == [AskPlacer("m", 1)]
    s.placer_answered("m", True, [ready("i1")], 0.1)
    s.finish("r0", 0.5)
    s.observe(ready("i1", at_s=1.0, state="draining"), 1.0)  # scaled down
    assert s.admit("r1", "m", 1.2) == [AskPlacer("m", 1)]
    s.placer_answered("m", True, [ready("i2", at_s=1.3)], 1.3)
    s.observe(ready("i3", at_s=1.4, state="starting"), 1.4)
    s.finish("r1", 1.5)
    s.observe(ready("i2", at_s=1.6, state="stopped"), 1.6)  # i3 is still coming: no new need
    assert [e for e in s.admit("r2", "m", 1.7) if isinstance(e, AskPlacer)] == []


def test_queue_limit_is_429_and_deadline_is_503_in_order():
    s = scheduler(limit=2, deadline_s=1.0)
    s.admit("r0", "m", 0.0)
    s.admit("r1", "m", 0.5)
    refused = s.admit("r2", "m", 0.6)
    assert [(e.status, e.request_id) for e in refused] == [(429, "r2")]
    assert s.next_deadline_s() == 1.0
    assert [(e.request_id, e.status) for e in s.tick(1.0) if isinstance(e, Refuse)] == [("r0", 503)]
    assert s.next_deadline_s() == 1.5 and s.load.outstanding("m") == 1


def test_withdrawn_request_leaves_the_queue_and_other_models_are_untouched():
    s = scheduler()
    s.observe(ready("o1", model="other"), 0)
    s.admit("r0", "m", 0)
    s.admit("r1", "m", 0)
    s.finish("r0", 0.1)  # client left while held
    assert s.queued("m") == 1
    assert dispatched(s.admit("x", "other", 0.2)) == [("x", "o1")]
    assert dispatched(s.observe(ready("i1"), 0.3)) == [("r1", "i1")]


def test_timing_splits_instance_start_wait_from_queue_wait():
    s = scheduler(b=1)
    s.admit("r0", "m", 1.0)
    s.admit("r1", "m", 2.0)
    [first] = [e for e in s.observe(ready("i1"), 4.0) if isinstance(e, Dispatch)]
    assert (first.start_wait_s, first.queue_wait_s) == (3.0, 0.0)
    [second] = [e for e in s.finish("r0", 5.0) if isinstance(e, Dispatch)]
    assert (second.start_wait_s, second.queue_wait_s) == (2.0, 1.0)
    assert dispatched(s.admit("r2", "m", 5.0)) == []  # i1 is busy with r1 (B=1): r2 waits in the queue
    [third] = [e for e in s.finish("r1", 6.0) if isinstance(e, Dispatch)]
    assert (third.start_wait_s, third.queue_wait_s) == (0.0, 1.0)


def test_newer_observation_wins_and_lost_instances_abort_their_answering_requests():
    s = scheduler()
    s.observe(ready("i1", at_s=10.0), 0)
    stale_view = s.observe_node("n0", [], as_of_s=9.0, now_s=0)  # older heartbeat without i1
    assert stale_view == [] and dispatched(s.admit("r0", "m", 0)) == [("r0", "i1")]
    s.answering("r0")
    assert s.observe_node("n0", [], as_of_s=11.0, now_s=1) == [Abort("r0", "i1")]
    s.observe(ready("i2", node="n1", at_s=20.0), 2)
    assert s.forget_dead_nodes(alive={"n0"}, stale_before_s=19.0, now_s=3) == []
    s.admit("r1", "m", 3)
    s.answering("r1")
    assert s.forget_dead_nodes(alive={"n0"}, stale_before_s=21.0, now_s=4) == [Abort("r1", "i2")]


def test_a_lost_instance_sends_its_unanswered_requests_elsewhere_in_arrival_order():
    s = scheduler(b=2, deadline_s=10.0)
    s.observe(ready("i1", at_s=1), 0)
    s.observe(ready("i2", node="n1", at_s=1), 0)
    assert dispatched(s.admit("r0", "m", 0) + s.admit("r1", "m", 1) + s.admit("r2", "m", 2)) == [
        ("r0", "i1"), ("r1", "i2"), ("r2", "i1")]
    s.answering("r0")
    s.admit("r3", "m", 3)  # i2 takes it (one free slot)
    s.admit("r4", "m", 4)  # both full: waits
    effects = s.observe(ready("i1", state="stopped", at_s=5), 5)
    assert [e for e in effects if not isinstance(e, Dispatch)][:2] == [Abort("r0", "i1"), Requeue("r2", "i1")]
    assert s.queued("m") == 2 and s.ready_instances("m") == ["i2"]
    assert dispatched(s.finish("r1", 6)) == [("r2", "i2")]  # r2 arrived before r4: it goes first
    assert [e.request_id for e in s.tick(13.9) if isinstance(e, Refuse)] == []
    assert [e.request_id for e in s.tick(14) if isinstance(e, Refuse)] == ["r4"]  # its deadline is kept: 4 + 10 s


def test_an_unacknowledged_send_is_sent_again_unless_its_answer_has_started():
    s = scheduler(b=1)
    s.observe(ready("i1", at_s=1), 0)
    assert dispatched(s.admit("r0", "m", 0)) == [("r0", "i1")]
    effects = s.unacknowledged("r0", "i1", 3)
    assert effects[0] == Requeue("r0", "i1") and dispatched(effects) == [("r0", "i1")]  # i1 still serves
    s.answering("r0")
    assert s.unacknowledged("r0", "i1", 6) == [] and s.instance_load("i1") == 1


def test_an_instance_that_refuses_a_request_takes_no_more_and_the_request_goes_elsewhere():
    s = scheduler(b=1)
    s.observe(ready("i1", at_s=1), 0)
    s.observe(ready("i2", node="n1", at_s=1), 0)
    assert dispatched(s.admit("r0", "m", 0)) == [("r0", "i1")]
    assert dispatched(s.instance_refused("r0", "i1", 1)) == [("r0", "i2")]
    assert s.ready_instances("m") == ["i2"] and s.instance_load("i1") == 0
    assert s.instance_refused("r0", "i1", 2) == []  # a late refusal from where it no longer is


def test_a_stopped_instance_is_not_revived_by_an_older_view():
    s = scheduler()
    s.observe(ready("i1", at_s=10.0), 0)
    s.observe(ready("i1", state="stopped", at_s=10.5), 0)
    s.observe_node("n0", [ready("i1", at_s=10.2)], as_of_s=10.2, now_s=1)  # stale view read from Redis
    assert s.ready_instances("m") == []
    s.observe_node("n0", [ready("i1", at_s=11.0)], as_of_s=11.0, now_s=2)  # a newer view: it is back
    assert s.ready_instances("m") == ["i1"]


def test_draining_instance_keeps_its_requests_but_takes_no_new_ones():
    s = scheduler(b=4)
    s.observe(ready("i1", at_s=1), 0)
    s.admit("r0", "m", 0)
    assert s.observe(ready("i1", state="draining", at_s=2), 0) == []
    assert s.admit("r1", "m", 0) == [AskPlacer("m", 1)] and s.instance_load("i1") == 1


def test_load_meter_time_weighted_average_peak_and_arrivals():
    meter = LoadMeter(now_s=0.0)
    meter.change("m", +1, 0.0, arrival=True)
    meter.change("m", +1, 0.5, arrival=True)
    meter.change("m", -2, 0.75)
    [sample] = meter.sample(1.0, at_s=1000.0)
    assert (sample.avg_outstanding, sample.peak_outstanding, sample.arrivals) == (1.0, 2, 2)
    meter.change("m", +1, 1.5)
    [idle_then_one] = meter.sample(2.0, at_s=1001.0)
    assert (idle_then_one.avg_outstanding, idle_then_one.peak_outstanding, idle_then_one.interval_s) == (0.5, 1, 1.0)


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("fields,param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": True}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "seed": "s"}, "seed"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ({"model": "m", "prompt": "x", "seed": 2**70}, "seed"),
    ({"model": "m", "prompt": "x", "max_tokens": 2**64}, "max_tokens"),
    ({"model": "m", "prompt": "\ud800abc"}, "prompt"),
    ({"model": "\udfff", "prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": [[]]}, "prompt"),
    ({"model": "m", "prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"model": "m", "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": "m", "prompt": "x", "min_tokens": 20, "max_tokens": 10}, "min_tokens"),
])
def test_invalid_fields_are_named(fields, param):
    with pytest.raises(ApiError) as info:
        parse_request(body(**fields), chat=False)
    assert info.value.status == 400 and info.value.param == param


def test_tool_turns_pass_and_their_text_is_kept_for_text_engines():
    request = parse_request(body(model="m", messages=[
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]), chat=True)
    assert request.messages == [{"role": "user", "content": "q", "name": "ann"},
                                {"role": "assistant", "content": ""}, {"role": "tool", "content": "42"}]


@pytest.mark.parametrize("fields", [
    {"logprobs": True, "top_logprobs": 3}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"tool_choice": "required"}, {"response_format": {"type": "json_object"}}, {"n": 3}, {"echo": True},
    {"use_beam_search": True}, {"structured_outputs": {"choice": ["a", "b"]}}, {"frobnicate": 1},
])
def test_parameters_go_to_the_engine_in_the_body_unchanged(fields):
    raw = body(model="m", messages=[{"role": "user", "content": "q"}], **fields)
    assert parse_request(raw, chat=True).body == raw  # vLLM's server judges them (unknown ones: ignored there)


def test_model_only_bodies_stream_only_where_the_route_streams():
    """/v1/responses may stream (the gateway then relays events); /tokenize has no such field."""
    body = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()
    assert parse_model_request(body, streams=True).stream and not parse_model_request(body).stream
    with pytest.raises(ApiError, match="stream"):
        parse_model_request(json.dumps({"model": "m", "stream": "yes"}).encode(), streams=True)


def test_default_valued_and_metadata_parameters_are_accepted_and_sampling_ones_carried():
    request = parse_request(body(
        model="m", messages=[{"role": "user", "content": "q"}], logprobs=False, n=1, tools=[], tool_choice="none",
        response_format={"type": "text"}, user="u1", metadata={"k": "v"}, store=False, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, top_k=5, min_p=0.1, min_tokens=2, stop_token_ids=[7],
        logit_bias={"11": -100}, seed=-(2**63)), chat=True)
    spec = request.sampling
    assert (spec.presence_penalty, spec.frequency_penalty, spec.repetition_penalty, spec.top_k, spec.min_p,
            spec.min_tokens, spec.stop_token_ids, spec.logit_bias, spec.seed) == (
        0.5, -0.5, 1.1, 5, 0.1, 2, [7], {11: -100.0}, -(2**63))


@pytest.mark.parametrize("raw,problem", [
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "non-finite"),
    (b'{"model": "m", "prompt": "x", "temperature": Infinity}', "non-finite"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e999}', "non-finite"),
    (b'{"model": "m", "prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"model": "m", "prompt": "x", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "nested"),
    (b'{"model": "m", "prompt": "x", "user": "\udfff"}', "Unicode"),
    (b'{"model": "m", "prompt": "x", "metadata": {"\ud800": 1}}', "Unicode"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1]", "JSON object"),
])
def test_hostile_bodies_are_400s_naming_the_problem(raw, problem):
    with pytest.raises(ApiError) as info:
        parse_request(raw, chat=False)
    assert info.value.status == 400 and problem in info.value.message


def test_defaults_and_context_fitting():
    chat = parse_request(body(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}],
                              max_completion_tokens=7, stop="x"), chat=True)
    assert chat.messages == [{"role": "user", "content": "ab"}] and chat.sampling.max_tokens == 7
    assert chat.sampling.stop == ["x"]
    plain = parse_request(body(model="m", prompt=["only"]), chat=False)
    assert plain.prompt == "only" and plain.sampling.max_tokens == 16
    assert parse_request(body(model="m", prompt=["a", [5, 6]]), chat=False).prompt == "a 5 6"  # a batch, as text
    assert fit_to_context(parse_request(body(model="m", messages=[{"role": "user", "content": "q"}]), chat=True),
                          100).sampling.max_tokens == 100  # the chat default is clipped to the context
    with pytest.raises(ApiError, match="max_tokens"):
        fit_to_context(parse_request(body(model="m", prompt="x", max_tokens=101), chat=False), 100)


def test_model_cards_pick_the_warmest_state():
    info = {name: ModelInfo(name=name, path="/p", size_bytes=1, content_hash="h") for name in "abcd"}
    copy = lambda model, state: CopyView(model=model, content_hash="h", devices=[0], state=state, bytes=1)  # noqa: E731
    view = NodeView(node="n", at_s=0, instances=[
        InstanceView(instance_id="i", model="a", devices=[0], state=InstanceState.ready),
        InstanceView(instance_id="j", model="b", devices=[1], state=InstanceState.starting)],
        copies=[copy("a", CopyState.ready), copy("c", CopyState.ready), copy("c", CopyState.loading)])
    cards = {card["id"]: card["warm"] for card in model_cards(info, {"n": view}, 0)["data"]}
    assert [cards[m]["state"] for m in "abcd"] == ["serving", "starting", "prewarmed", "cold"]
    assert (cards["c"]["copies_prewarmed"], cards["c"]["copies_loading"]) == (1, 1)
