"""The benchmark suite: ``python -m bench [reply load lag swap votes train memory]`` (``make bench``).

One module per benchmark, each also runnable alone (``python -m bench.reply --help``):

    reply    one reply and 16 at once: time to first token, whole reply, tokens/s
    load     1, 4 and 16 simulated people through ChatCore.on_message: replies/min, p95, queue
    lag      event-loop lag p99 while replies generate and while a LoRA version is installed
    swap     20 hot-swaps under continuous load: failed replies, activation → first reply
    votes    reactions through ChatCore.on_reaction: votes/s, database size per million votes
    train    a training round: rated replies per second, the wall time of a 256-reply round
    memory   resident memory of the bot with the model and three loaded versions

Every figure is printed beside a plain baseline measured in the same run (plain
transformers / peft / sqlite3, or the same workload without the product's extra work),
because the machines these run on are shared and noisy: read the ratios first.
Results go to ``bench/out/NAME.json`` and ``bench/out/NAME.md`` with the machine's core
count, load average and package versions. ``bench/common.py`` holds what they share.

Not part of ``make test``; ``tests/test_bench.py`` runs each once on the tiny model.
"""

from bot import process

process.quiet_threads()      # before anything imports torch (bot/process.py says why)
