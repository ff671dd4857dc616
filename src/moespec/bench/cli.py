"""`moespec bench` (being written)."""


def add_bench_parser(sub, model_args):
    b = sub.add_parser("bench", help="time prefill and decode; compare with transformers")
    model_args(b)


def run_bench(a):
    raise SystemExit("bench: not yet")
