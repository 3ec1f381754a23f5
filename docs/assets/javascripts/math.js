// Renders the math that pymdownx.arithmatex (generic mode) leaves in the page:
// <span class="arithmatex">\( … \)</span> inline and <div class="arithmatex">\[ … \]</div> display.
// KaTeX is vendored next to this file (../katex), so no network is needed.
document$.subscribe(() => {
  for (const element of document.querySelectorAll(".arithmatex")) {
    if (element.querySelector(".katex") || element.dataset.mathError) continue;
    const source = element.textContent.trim();
    try {
      katex.render(source.slice(2, -2), element, {
        displayMode: element.tagName === "DIV",
        throwOnError: true,
      });
    } catch (error) {
      // leave the source as it is, and say why (make docs-check reports it)
      element.dataset.mathError = String(error.message || error);
      console.error("KaTeX:", element.dataset.mathError, source);
    }
  }
});
