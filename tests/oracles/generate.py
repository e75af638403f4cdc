"""Makes every oracle file the C++ tests read: small random Hugging Face models with reference outputs from
transformers, tokenizers trained by sentencepiece / tokenizers, NF4 bytes from bitsandbytes, ...

Each tests/oracles/gen_*.py module defines generate(out_dir: pathlib.Path) and writes under out_dir/<its name>.
Run by ctest as the fixture 'oracles' before the tests that need it; no network is used."""
import argparse, importlib, os, pathlib, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="module names (gen_xxx) to run; default all")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = pathlib.Path(__file__).parent
    sys.path.insert(0, str(here))
    import bnb_cpu
    if bnb_cpu.make_row_safe():
        print("bitsandbytes' CPU dequantize_4bit runs on flat tensors here (bnb_cpu.py says why)", flush=True)
    names = sorted(p.stem for p in here.glob("gen_*.py"))
    if args.only:
        names = [n for n in names if n in args.only]
    for name in names:
        t0 = time.time()
        importlib.import_module(name).generate(out)
        print(f"{name}: {time.time() - t0:.1f} s", flush=True)

if __name__ == "__main__":
    main()
