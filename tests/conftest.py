"""One CPU thread for the whole suite unless OMP_NUM_THREADS says otherwise: the tests run tiny
tensors, where a second thread only contends (README "Timings"). Set before torch is imported."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
