"""Run from outside the repository (it uses only the installed package and a served model): an OpenRLHF-0.11.2-style caller (one sample per POST, aiohttp, 180 s timeout,
query = decode(prompt_ids cut from the left to max_prompt_length + action_ids)), whose policy template (Zephyr)
differs from the reward backbone's (ChatML), against `rewardsvc serve --http-port` on the default model."""
import asyncio, glob, json, math, os, subprocess, sys, time
os.makedirs("/tmp/openrlhf-check", exist_ok=True)
import aiohttp
from transformers import AutoTokenizer
from rewardsvc.client import RewardClient

conv_dir = glob.glob(os.path.expanduser("~/.cache/rewardsvc/converted/*"))[0]
tok = AutoTokenizer.from_pretrained(conv_dir)
tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
tok.save_pretrained("/tmp/openrlhf-check/policy")

topics = ["the moon", "bread", "rivers", "chess", "volcanoes", "tea", "bees", "glass"]
samples = []
for i in range(48):
    t = topics[i % 8]
    conv = [{"role": "user", "content": f"Tell me one fact about {t}." + (" Please explain in detail why it matters to people." * (i % 4))},
            {"role": "assistant", "content": f"A short fact about {t}: it is studied by scientists." if i % 2 else "I don't know."}]
    if i % 3 == 0:
        conv = [{"role": "system", "content": "You are a careful assistant."}] + conv
    samples.append(conv)

srv = subprocess.Popen([sys.executable, "-m", "rewardsvc", "serve", "--port", "50095", "--http-port", "8095",
                        "--http-policy-template", "/tmp/openrlhf-check/policy"], stdout=subprocess.DEVNULL, stderr=open("/tmp/openrlhf-check/serve.log", "w"))
try:
    client = RewardClient("127.0.0.1:50095")
    for _ in range(600):
        try:
            if client.health(timeout=2) == "SERVING": break
        except Exception:
            pass
        time.sleep(1)

    async def one(session, conv, max_prompt_length=40):
        prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        full = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = full[-max_prompt_length:] if len(full) > max_prompt_length else full
        action = tok(conv[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        query = tok.decode(ids + action, skip_special_tokens=False)
        async with session.post("http://127.0.0.1:8095/get_reward", json={"query": [query], "prompts": [prompt], "labels": [None]}) as r:
            r.raise_for_status()
            body = await r.json()
        return len(ids) < len(full), body

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
            return await asyncio.gather(*(one(s, c) for c in samples))

    while True:
        try:
            out = asyncio.run(main()); break
        except aiohttp.ClientConnectorError:
            time.sleep(2)
    expected = [r.score for r in client.score(samples)]
    cut = sum(c for c, _ in out)
    finite = all(math.isfinite(b["rewards"][0]) for _, b in out)
    diffs = [abs(b["rewards"][0] - e) for (c, b), e in zip(out, expected) if not c]
    print(json.dumps({"samples": len(out), "left_cut": cut, "all_finite": finite,
                      "uncut_max_abs_diff_vs_grpc": max(diffs), "cut_flags": [b["extra_logs"].get("prompt_cut") for _, b in out][:8]}))
finally:
    srv.terminate(); srv.wait(60)
