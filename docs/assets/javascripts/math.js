// Renders the math that pymdownx.arithmatex (generic mode) leaves in the page:
// <span class="arithmatex">\( … \)</span> inline and <div class="arithmatex">\[ … \]</div> display.
// KaTeX is vendored next to this file (../katex), so no network is needed.
document$.subscribe(() => {
  for (const element of document.querySelectorAll(".arithmatex")) {
    if (element.querySelector(".katex")) continue;
    const source = element.textContent.trim();
    katex.render(source.slice(2, -2), element, {
      displayMode: element.tagName === "DIV",
      throwOnError: false, // an error shows as .katex-error, which make docs-check reports
    });
  }
});
