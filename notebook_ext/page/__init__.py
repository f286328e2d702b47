"""The standalone page (`gpuherd panel`): a one-cell notebook Voila serves."""
