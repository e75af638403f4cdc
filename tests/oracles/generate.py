import sys; print("ok")
