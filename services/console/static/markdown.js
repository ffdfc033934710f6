// A small markdown renderer of our own (MIT, this project's licence): fenced code blocks, inline
// code, headings, bold, italics, lists, block quotes and http(s) links. Everything is escaped
// first, so a model's output can never inject markup. An unfinished fence (mid-stream) renders
// as an open code block, so streaming text looks right at every step.
"use strict";
(function () {
  function escape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function inline(text) {
    const codes = [];
    let out = escape(text).replace(/`([^`]+)`/g, (_, code) => { codes.push(code); return "\u0000" + (codes.length - 1) + "\u0000"; });
    out = out.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
             .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
             .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
    return out.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[Number(i)] + "</code>");
  }

  function render(source) {
    const lines = source.replace(/\r\n/g, "\n").split("\n");
    const html = [];
    let i = 0;
    let list = null;
    const closeList = () => { if (list) { html.push(`</${list}>`); list = null; } };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)/);
      if (fence) {
        closeList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```/.test(lines[i])) { body.push(lines[i]); i++; }
        i++; // the closing fence, if there is one yet
        const lang = fence[1] ? ` data-lang="${escape(fence[1])}"` : "";
        html.push(`<pre${lang}><code>${escape(body.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        closeList();
        const level = heading[1].length + 2; // h3..h6 inside a message
        html.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); html.push(`<${kind}>`); list = kind; }
        html.push(`<li>${inline((bullet || numbered)[1])}</li>`);
      } else if (/^\s*>/.test(line)) {
        closeList();
        html.push(`<blockquote>${inline(line.replace(/^\s*>\s?/, ""))}</blockquote>`);
      } else if (line.trim() === "") {
        closeList();
      } else {
        closeList();
        const para = [line];
        while (i + 1 < lines.length && lines[i + 1].trim() !== "" && !/^\s*(```|#{1,4}\s|[-*+]\s|\d+[.)]\s|>)/.test(lines[i + 1])) {
          para.push(lines[++i]);
        }
        html.push(`<p>${para.map(inline).join("<br>")}</p>`);
      }
      i++;
    }
    closeList();
    return html.join("");
  }

  window.renderMarkdown = render;
})();
