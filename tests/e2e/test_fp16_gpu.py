"""test_fp16.py's checks on CUDA: overflowing fp16 steps skipped and the scale halved, the scale in the checkpoint, a
resumed run's adapter byte for byte the straight run's, the default scale following fp32's losses."""
import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_fp16

if __name__ == "__main__":
    test_fp16.DEVICE = "cuda"
    test_fp16.main()
