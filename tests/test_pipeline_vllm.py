"""``pipeline.open_model(name, "vllm", adapter=...)``, as notebook 03 calls it for a distilled student: no error,
and every request names the student's LoRA module (fake OpenAI-compatible servers that record requests)."""

from __future__ import annotations

from test_vllm_students import BASE, HI, _adapter, vllm_servers  # noqa: F401 - the fixture

from agentlib import pipeline


def test_a_distilled_student_on_a_vllm_pool_requests_its_lora_module(vllm_servers, tmp_path, monkeypatch):  # noqa: F811
    adapter = _adapter(tmp_path, "agent")
    server, url = vllm_servers([BASE, "agent"])
    monkeypatch.setenv("AGENTLIB_ENDPOINTS", url)
    with pipeline.open_model(BASE, "vllm", adapter=adapter) as model:
        assert model.chat_batch([HI, HI], max_tokens=4) == [["from agent"], ["from agent"]]
    assert [r["model"] for r in server.requests] == ["agent", "agent"]
    with pipeline.open_model(BASE, "vllm") as model:  # an untuned method: the base model
        model.chat(HI, max_tokens=4)
    assert server.requests[-1]["model"] == BASE
