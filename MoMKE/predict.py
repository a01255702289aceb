"""`python -m MoMKE.predict RUN --data-root D --out FILE.csv`: a trained model's predictions on
features, labelled or not. The code lives in `MoMKE/experiments/predict.py`; this entry point
keeps the command users type."""
import sys

from MoMKE.experiments.predict import main

if __name__ == "__main__":
    sys.exit(main())
